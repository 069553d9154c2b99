"""LoRA dropout, ``dropout(x)`` on the LoRA branch's input, in a form that a CUDA graph can
replay and a checkpointed recomputation can repeat.

torch's dropout draws from the CUDA generator, whose state a recomputation must save and
restore on the host, which a CUDA-graph capture cannot do. Inside :func:`counting` (what
``train.step_graph.GraphedTrainStep`` runs its steps in), on the kernels' path (CUDA, or the
interpreter), each call takes the next value of a per-device seed counter, an int64 tensor
on the device: the kernel (``triton_kernels.dropout``) reads it and keeps it for the
backward, which draws the same mask again from it, and the counter moves on by one on the
device. A graph that replays the step advances the counter and draws fresh masks each
replay, and a recomputation (``recompute.ReplayState``) rewinds the counter to where its
forward found it and drops the same elements.

Outside :func:`counting` (eager training) it is ``F.dropout``: one C++ op, where the
counter's call costs an autograd Function and a Triton launch from Python, which an eager
step bound by its host's launches pays for (SmolLM3-3B: 364 -> 531 ms a step when every
eager call counted on the device; benchmarks/NOTES.md). ``ReplayState`` saves and restores
torch's generators for those.

Reproducible runs: :func:`manual_seed` sets every counter (the Trainer seeds it with its
seed); unseeded, a counter starts from torch's CPU generator at its first use. A training
checkpoint keeps the counters (:func:`get_state`, :func:`set_state`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .dispatch import use_triton

_counters: dict[torch.device, torch.Tensor] = {}
_seed: int | None = None
_counting = 0  # depth of counting() blocks


@contextlib.contextmanager
def counting() -> Iterator[None]:
    """Dropout inside the block draws from the device counters (on the kernels' path)."""
    global _counting
    _counting += 1
    try:
        yield
    finally:
        _counting -= 1


def is_counting() -> bool:
    return _counting > 0


def _start(seed: int) -> int:
    # any fixed map of the user's seed to 62 bits (Philox's key is 64)
    return (int(seed) * 6364136223846793005 + 1442695040888963407) % (1 << 62)


def _key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def counter(device: torch.device | str) -> torch.Tensor:
    """The seed counter of ``device`` (made at first use, outside any CUDA-graph capture)."""
    device = _key(device)
    t = _counters.get(device)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the dropout seed counter is made by an eager call before a CUDA-graph capture; "
                               "run the step once eagerly first")
        start = _start(_seed) if _seed is not None else int(torch.randint(0, 1 << 62, (1,)))
        t = torch.tensor([start], dtype=torch.int64, device=device)
        _counters[device] = t
    return t


def manual_seed(seed: int) -> None:
    """Start every device's counter (those made later too) from ``seed``."""
    global _seed
    _seed = int(seed)
    for t in _counters.values():
        t.fill_(_start(_seed))


def get_state() -> dict[str, int]:
    """Each device's counter, for a checkpoint (reads them back to the host)."""
    return {str(d): int(t) for d, t in _counters.items()}


def set_state(state: dict[str, int]) -> None:
    """Counters from :func:`get_state` (a CUDA device's skipped where CUDA is absent)."""
    for device, value in state.items():
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            continue
        counter(device).fill_(int(value))


class _Dropout(torch.autograd.Function):
    """y = x·mask/(1 − p). Backward: dx = dy·mask/(1 − p), the mask drawn again from the
    call's seed (dropout is linear in x for a fixed mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
        from ..triton_kernels.dropout import dropout_apply

        ctx.p = p
        ctx.save_for_backward(seed)
        return dropout_apply(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ..triton_kernels.dropout import dropout_apply

        (seed,) = ctx.saved_tensors
        return dropout_apply(dy.contiguous(), ctx.p, seed), None, None


def lora_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout with probability ``p`` (identity when p is 0 or not training)."""
    if p <= 0 or not training:
        return x
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not (_counting and use_triton(x)):
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("LoRA dropout through torch's generator cannot be captured in a CUDA graph: "
                               "run the step inside ops.dropout.counting() with the Triton kernels "
                               "(GraphedTrainStep does)")
        return F.dropout(x, p)
    c = counter(x.device)
    seed = c.clone()  # this call's seed, kept for its backward
    c.add_(1)
    return _Dropout.apply(x, p, seed)
