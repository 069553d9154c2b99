"""Split-K in one launch: the programs that share an output tile add their partials.

Each of a tile's ``SPLIT_K`` programs (grid axis 1) writes its fp32 partial to a workspace
and bumps the tile's counter; the one that finds ``SPLIT_K - 1`` already there is the
last, reads every partial back in split order (so the sum is the same on every run),
resets the counter, and carries on to the epilogue. No zero-filled output, no atomic
adds into it, no cast kernel afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_counters: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 counter per output tile, kept per device; each launch leaves them
    at zero again. Launches that overlap in time (two streams) must not share them: the
    library issues its products on one stream. Allocated on first use, which the
    dispatch's tuning call makes before any CUDA-graph capture."""
    cnt = _counters.get(device)
    if cnt is None or cnt.numel() < n:
        cnt = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _counters[device] = cnt
    return cnt


@triton.jit
def split_k_sum(acc, ws_ptr, local, cnt_ptr, TILE: tl.constexpr, SPLIT_K: tl.constexpr):
    """(the tile's full sum, True) in its last program; (acc, False) in the others.

    ``local`` [same shape as acc] are the element offsets within one ``TILE``-element
    tile; the workspace holds ``SPLIT_K × grid(0)`` tiles, split-major.
    """
    tile_id = tl.program_id(0)
    ws_tile = ws_ptr + tile_id.to(tl.int64) * TILE + local
    stride_split = tl.num_programs(0).to(tl.int64) * TILE
    tl.store(ws_tile + tl.program_id(1) * stride_split, acc)
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.load(ws_tile, cache_modifier=".cg")  # L2: other SMs wrote these
        for sp in tl.static_range(1, SPLIT_K):
            acc += tl.load(ws_tile + sp * stride_split, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    return acc, last
