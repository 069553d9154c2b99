"""The LoRA branch's thin product at a few rows, ``xa = x·Aᵀ`` (x [M ≤ 16, K], A [r, K]), in
one launch (generation's decode steps).

At one token the product is ~K·r multiply-adds: nothing, but cuBLAS runs it as a split-K
GEMM and a separate reduction (two launches, ~6 µs on the H200), twice a layer's projection
group. Here the programs of grid axis 1 each take a chunk of K (grid axis 0: blocks of 16
columns of r), and the last program of a column block to finish sums the fp32 partials in
split order (triton_kernels/split_k.py: deterministic, no zero-filled output) and writes
the result once, rounded to x's dtype. Products are exact and sums fp32 as in cuBLAS
(``tl.dot`` of 16-bit inputs, fp32 accumulation; fp32 inputs with IEEE products).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_k import split_counters, split_k_sum

# the most programs along K: past this the last program's sum of partials costs more than
# the chunks it shortens
MAX_SPLIT = 64


@triton.jit
def _thin_kernel(X, A, OUT, WS, CNT, M, K, R, x_sm, a_sr, o_sm, k_chunk,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 IEEE: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    r = pid_r * BLOCK_R + rr
    kk = tl.arange(0, BLOCK_K)
    mm = m < M
    rm = r < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    k_lo = pid_k * k_chunk
    for k0 in range(k_lo, tl.minimum(k_lo + k_chunk, K), BLOCK_K):
        k = k0 + kk
        km = k < K
        x = tl.load(X + m[:, None].to(tl.int64) * x_sm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        a = tl.load(A + r[:, None].to(tl.int64) * a_sr + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(a), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(a))
    local = m[:, None] * BLOCK_R + rr[None, :]
    acc, last = split_k_sum(acc, WS, local, CNT, BLOCK_M * BLOCK_R, SPLIT_K)
    if last:
        tl.store(OUT + m[:, None].to(tl.int64) * o_sm + r[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mm[:, None] & rm[None, :])


def thin_matmul(x: torch.Tensor, a: torch.Tensor, block_k: int = 128) -> torch.Tensor:
    """``x·aᵀ`` for x [M, K] (1 ≤ M ≤ 16) and a [r, K], both with unit last stride and one
    dtype (fp16, bf16 or fp32): [M, r] in that dtype."""
    if x.dim() != 2 or a.dim() != 2 or x.shape[1] != a.shape[1]:
        raise ValueError(f"thin_matmul: x [M, K] and a [r, K] must share K; got {tuple(x.shape)} and {tuple(a.shape)}")
    if not 1 <= x.shape[0] <= 16:
        raise ValueError(f"thin_matmul takes 1 to 16 rows, got {x.shape[0]}")
    if x.dtype != a.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"thin_matmul: x and a must share one of fp16/bf16/fp32, got {x.dtype} and {a.dtype}")
    if x.stride(1) != 1 or a.stride(1) != 1:
        raise ValueError("thin_matmul: x and a need unit stride on K")
    M, K = x.shape
    R = a.shape[0]
    block_r = 16
    n_r = triton.cdiv(R, block_r)
    split = max(1, min(triton.cdiv(K, block_k), MAX_SPLIT, 128 // n_r))
    k_chunk = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_chunk)
    out = torch.empty(M, R, dtype=x.dtype, device=x.device)
    ws = torch.empty(split * n_r * 16 * block_r, dtype=torch.float32, device=x.device)
    cnt = split_counters(x.device, n_r)
    _thin_kernel[(n_r, split)](x, a, out, ws, cnt, M, K, R, x.stride(0), a.stride(0), out.stride(0), k_chunk,
                               BLOCK_M=16, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split,
                               IEEE=x.dtype == torch.float32, num_warps=4)
    return out
