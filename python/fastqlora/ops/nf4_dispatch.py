"""Choosing, per shape and GPU, between the fused NF4 kernel and "dequantize + cuBLAS".

For each key (direction, GPU, dtype, M rounded up to a power of two, the weights' shapes,
LoRA rank) the first call times the kernel configurations of
``fastqlora.triton_kernels.nf4_configs`` and the plain path (the weight dequantized into
a reused buffer, then cuBLAS), and keeps the fastest; so no shape is slower than the
plain path. A configuration is used only if its result on that first call agrees with the
plain path's (:data:`CHECK_TOL`). The choice is cached for the process.
``FASTQLORA_NF4_TUNE=0`` skips the timing and uses :data:`DEFAULT_PATH` (after the same
check), and the interpreter always uses the first configuration. :func:`choices` lists
what was picked, :func:`rejected` what the check refused.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Union

import torch

from ..triton_kernels import nf4_configs
from ..triton_kernels.nf4_configs import DecodeMmaConfig, GemvConfig, MatmulConfig

CUBLAS = "dequant+cublas"
Choice = Union[MatmulConfig, GemvConfig, DecodeMmaConfig, str]

# When timing is off: the fused kernel where reading the weight dominates (decode), the
# plain path where the product dominates (its dequantization is ≤ 10% there).
DEFAULT_PATH = {"decode": "fused", "prefill": CUBLAS}

_cache: dict[tuple, Choice] = {}
_forced: str | None = None


@contextlib.contextmanager
def force(path: str | None) -> Iterator[None]:
    """Benchmarks: restrict the choice to "fused" (best timed config) or "dequant+cublas"."""
    global _forced
    if path not in (None, "fused", CUBLAS):
        raise ValueError(f"force() takes None, 'fused' or {CUBLAS!r}, got {path!r}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


# A fused configuration must agree with "dequantize + cuBLAS" to bf16 rounding (measured
# ~1e-3 relative) before the tuner may pick it; wrong decodes give ~1e-1.
CHECK_TOL = 1e-2
_rejected: list[tuple] = []


def _as_list(r) -> list[torch.Tensor]:
    return list(r) if isinstance(r, (list, tuple)) else [r]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error; infinite when it is not finite, so that a NaN result (what the
    tensor-core decode writes where it cannot run, see csrc/nf4_decode_mma.cu) fails the check
    and stays the largest of several outputs' errors (``max`` skips a NaN after the first)."""
    want = want.float()
    err = float((got.float() - want).norm() / want.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else math.inf


def rejected() -> list[tuple]:
    """(key, config, relative error) of every configuration the result check refused."""
    return list(_rejected)


def tuning_enabled() -> bool:
    return os.environ.get("FASTQLORA_NF4_TUNE", "1") != "0"


def choices() -> dict[tuple, str]:
    """What was picked so far (key: direction, device, capability, dtype, M bucket, output
    widths, K, LoRA rank, forced path, CUDA gemv possible) -> "dequant+cublas" or the kernel
    config's name."""
    return {k: (v if isinstance(v, str) else v.short()) for k, v in _cache.items()}


def clear() -> None:
    _cache.clear()


def _m_bucket(M: int) -> int:
    return 1 << max(0, (M - 1).bit_length())


def _time_ms(fn: Callable[[], object], reps: int = 7) -> float:
    """Mean GPU time of ``fn`` in ms, after a warm-up that also compiles.

    A millisecond of ``torch.cuda._sleep`` is queued first, so the GPU is still busy
    while Python enqueues the timed calls: the events then bracket GPU work only. (Timing
    one call at a time counts the host's launch cost too, which at decode shapes is as
    long as the kernel and would pick by Python overhead; in training and in captured
    decode graphs that cost overlaps other work.)
    """
    fn()
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def choose(
    kind: str,
    x: torch.Tensor,
    n_list: list[int],
    K: int,
    rank: int,
    run_fused: Callable[[MatmulConfig | GemvConfig | DecodeMmaConfig], object],
    run_plain: Callable[[], object],
    cuda_gemv: bool = False,
    cuda_mma: bool = False,
) -> Choice:
    """The path for a ``kind`` ("fwd" or "t") product of ``x`` [M, ·] with weights [n_i, K].

    ``run_fused(cfg)`` and ``run_plain()`` compute the product (their results are dropped
    while timing). ``cuda_gemv``: the extension's CUDA gemv (one or two rows) can take this
    product (its configs join the candidates); ``cuda_mma``: likewise the extension's
    tensor-core decode kernel (2 ≤ M ≤ 16).
    """
    M = x.shape[0]
    from .dispatch import interpreting

    if interpreting() or not x.is_cuda:
        if kind == "t":
            return nf4_configs.INTERPRET_T
        return nf4_configs.INTERPRET_GEMV if M <= nf4_configs.GEMV_MAX_M else nf4_configs.INTERPRET_FWD
    dev = x.device
    props = torch.cuda.get_device_properties(dev)
    cap = (props.major, props.minor)
    if _forced == CUBLAS:
        return CUBLAS
    key = (kind, str(dev), cap, x.dtype, _m_bucket(M), tuple(n_list), K, rank, _forced, cuda_gemv, cuda_mma)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if kind == "fwd":
        cands: list[Choice] = list(nf4_configs.gemv_candidates(M, max(n_list), K, cuda=cuda_gemv))
        # with several weights the tensor-core decode runs them in one launch (nf4_decode_mma_many)
        cands += nf4_configs.decode_mma_candidates(M, cuda_mma, sum(n_list), props.multi_processor_count)
        cands += nf4_configs.forward_candidates(cap, M, sum(n_list), K)
    else:
        cands = list(nf4_configs.transposed_candidates(cap, M, K))
    cls = "decode" if M <= nf4_configs.DECODE_MAX_M else "prefill"
    default = CUBLAS if (DEFAULT_PATH[cls] == CUBLAS or not cands) else cands[0]
    if _forced == "fused" and cands and (not tuning_enabled() or torch.cuda.is_current_stream_capturing()):
        return cands[0]
    if torch.cuda.is_current_stream_capturing():
        return default
    if not tuning_enabled() and default == CUBLAS:
        _cache[key] = CUBLAS
        return CUBLAS
    want = _as_list(run_plain())

    def agrees(cfg: Choice) -> bool:
        err = max(_rel_err(g, w) for g, w in zip(_as_list(run_fused(cfg)), want))
        if err < CHECK_TOL:
            return True
        _rejected.append((key, cfg.short(), err))
        warnings.warn(f"fastqlora: NF4 kernel config {cfg.short()} gave relative error {err:.2e} against "
                      f"dequantize + cuBLAS for {key[0]} {tuple(key[4:7])}; not used", RuntimeWarning)
        return False

    if not tuning_enabled():
        _cache[key] = default if agrees(default) else CUBLAS
        return _cache[key]
    best, best_t = CUBLAS, float("inf") if _forced == "fused" else _time_ms(run_plain)
    for cfg in cands:
        try:
            if not agrees(cfg):
                continue
            t = _time_ms(lambda: run_fused(cfg))
        except Exception:  # a config that does not fit this GPU (shared memory, registers)
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best == CUBLAS and _forced == "fused":  # no config ran: nothing to force
        best = cands[0] if cands else CUBLAS
    _cache[key] = best
    return best
