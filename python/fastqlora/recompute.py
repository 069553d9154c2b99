"""What a recomputation needs to repeat a forward exactly: the RNG states (so dropout draws
the same masks: torch's generators, and the device seed counter of LoRA dropout's kernels,
ops/dropout.py) and the autocast settings in force when the forward ran.

Used by gradient checkpointing (checkpointing.py) and tiled recomputation (tiling.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .ops import dropout


def _autocast_types() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


class ReplayState:
    """RNG and autocast state captured before a forward, replayed around its recomputation."""

    __slots__ = ("cpu_rng", "cuda_device", "cuda_rng", "autocast_state", "dropout_seed")

    def __init__(self, like: torch.Tensor):
        self.cpu_rng = torch.get_rng_state()
        # inside a CUDA-graph capture the generator's state cannot be read (and a captured
        # step draws no numbers from it: its LoRA dropout counts on the device), so none is kept
        cuda = like.is_cuda and not torch.cuda.is_current_stream_capturing()
        self.cuda_device = like.device if cuda else None
        self.cuda_rng = torch.cuda.get_rng_state(like.device) if cuda else None
        # LoRA dropout's seed counter as this forward found it (a device copy: capturable)
        self.dropout_seed = dropout.counter(like.device).clone() if dropout.is_counting() else None
        self.autocast_state = tuple(
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in _autocast_types())

    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """Set the captured RNG states; put the current ones back afterwards, so that a
        recomputation in backward does not move the random stream the next forward sees."""
        cpu_now = torch.get_rng_state()
        cuda_now = torch.cuda.get_rng_state(self.cuda_device) if self.cuda_device is not None else None
        seed_now = None
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.cuda_device)
        if self.dropout_seed is not None:
            counter = dropout.counter(self.dropout_seed.device)
            seed_now = counter.clone()
            counter.copy_(self.dropout_seed)
        try:
            yield
        finally:
            torch.set_rng_state(cpu_now)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(cuda_now, self.cuda_device)
            if seed_now is not None:
                dropout.counter(seed_now.device).copy_(seed_now)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast on or off per device type exactly as it was at capture."""
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.autocast_state:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield
