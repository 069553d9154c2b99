"""GPU-only timing for short kernels, shared by the benchmarks.

``triton.testing.do_bench`` records an event, lets Python launch the call, and records
another: for a 20 µs kernel the host's launch cost (Triton's launcher, ``torch.empty``
for the output) sits between the events and is counted as kernel time. ``gpu_ms`` queues
a long ``torch.cuda._sleep`` first, so Python enqueues every repetition while the GPU is
still busy; each repetition's events then bracket GPU work only. Like ``do_bench`` it
clears the L2 cache before each repetition (writes a 256 MB buffer), so inputs smaller
than L2 are still read from memory.
"""
from __future__ import annotations

from typing import Callable

import torch

_FLUSH_BYTES = 256 << 20


def gpu_ms(fn: Callable[[], object], reps: int = 50, warmup: int = 5) -> float:
    """Median GPU time of one ``fn()`` in ms, L2 cleared before each call."""
    for _ in range(warmup):
        fn()
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    # ~20 ms at ~2 GHz: longer than Python needs to enqueue the first repetitions; after
    # that each repetition's flush (~80 µs of GPU time) keeps the GPU behind the host.
    torch.cuda._sleep(40_000_000)
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]
