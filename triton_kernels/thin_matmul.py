"""The LoRA branch's thin product at a few rows, ``xa = x·Aᵀ`` (x [M ≤ 16, K], A [r, K]), in
one launch (generation's decode steps).

At one token the product is ~K·r multiply-adds: nothing, but cuBLAS runs it as a split-K
GEMM and a separate reduction (two launches, ~6 µs on the H200), twice a layer's projection
group. Here the programs of grid axis 1 each take a chunk of K (grid axis 0: blocks of 16
columns of r), and the last program of a column block to finish sums the fp32 partials in
split order (triton_kernels/split_k.py: deterministic, no zero-filled output) and writes
the result once, rounded to x's dtype. Products are exact and sums fp32 as in cuBLAS
(``tl.dot`` of 16-bit inputs, fp32 accumulation; fp32 inputs with IEEE products).

At a few rows (a decode step at batch 1-4, or 8 on K <= 4096; `rows_kernel_fits`) the split's
partials cost more than they share out: a program writes its partial, bumps a counter in L2 and the last one reads the
partials back, three trips to L2 after the first loads. There ``_thin_rows_kernel`` instead
gives each program one row of A and the whole of K (elementwise fp32 products of a chunk,
the next chunk's loads issued before this one's products, one sum at the end): no workspace,
no counter, one trip.
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


@triton.jit
def _thin_rows_kernel(X, A, OUT, M, K, x_sm, a_sr, o_sm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # program r: out[:, r] = Σ_k x[:, k]·a[r, k], fp32 products and sums, chunk by chunk with
    # the next chunk's loads in flight during this one's products
    r = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    mm = m < M
    xp = X + m[:, None].to(tl.int64) * x_sm + kk[None, :]
    ap = A + r.to(tl.int64) * a_sr + kk
    x = tl.load(xp, mask=mm[:, None] & (kk < K)[None, :], other=0.0)
    a = tl.load(ap, mask=kk < K, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
        k = k0 + kk
        x_next = tl.load(xp + k0, mask=mm[:, None] & (k < K)[None, :], other=0.0)
        a_next = tl.load(ap + k0, mask=k < K, other=0.0)
        acc += x.to(tl.float32) * a.to(tl.float32)[None, :]
        x = x_next
        a = a_next
    out = tl.sum(acc, axis=1)
    tl.store(OUT + m.to(tl.int64) * o_sm + r, out.to(OUT.dtype.element_ty), mask=mm)


def rows_kernel_fits(M: int, K: int) -> bool:
    """Whether "auto" takes the kernel of a program a row of A: up to 4 rows of x, 8 when
    K <= 4096 (H200, benchmarks/bench_thin_matmul.py: 1.7-1.9 µs against the split's 3.75 at
    one and two rows, 3.1-3.3 against 3.77 at 8 rows of K = 4096; at 16 rows its registers
    spill, 46-99 µs)."""
    return M <= 4 or (M <= 8 and K <= 4096)


def thin_matmul(x: torch.Tensor, a: torch.Tensor, block_k: int = 128, method: str = "auto") -> torch.Tensor:
    """``x·aᵀ`` for x [M, K] (1 ≤ M ≤ 16) and a [r, K], both with unit last stride and one
    dtype (fp16, bf16 or fp32): [M, r] in that dtype. ``method``: "split" (split-K over
    ``block_k`` chunks, tensor cores), "rows" (a program a row of a, elementwise), or "auto"
    (rows where `rows_kernel_fits`)."""
    if x.dim() != 2 or a.dim() != 2 or x.shape[1] != a.shape[1]:
        raise ValueError(f"thin_matmul: x [M, K] and a [r, K] must share K; got {tuple(x.shape)} and {tuple(a.shape)}")
    if not 1 <= x.shape[0] <= 16:
        raise ValueError(f"thin_matmul takes 1 to 16 rows, got {x.shape[0]}")
    if x.dtype != a.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"thin_matmul: x and a must share one of fp16/bf16/fp32, got {x.dtype} and {a.dtype}")
    if x.stride(1) != 1 or a.stride(1) != 1:
        raise ValueError("thin_matmul: x and a need unit stride on K")
    if method not in ("auto", "split", "rows"):
        raise ValueError(f"thin_matmul: method must be 'auto', 'split' or 'rows', got {method!r}")
    M, K = x.shape
    R = a.shape[0]
    if method == "rows" or (method == "auto" and rows_kernel_fits(M, K)):
        out = torch.empty(M, R, dtype=x.dtype, device=x.device)
        # chunks of up to 4096 (a whole Llama K at once); at K = 14336, 8192 was 0.2 µs faster
        # (H200), left at 4096 for the registers at 4-8 rows
        chunk = min(4096, triton.next_power_of_2(K))
        _thin_rows_kernel[(R,)](x, a, out, M, K, x.stride(0), a.stride(0), out.stride(0),
                                BLOCK_M=triton.next_power_of_2(M), BLOCK_K=chunk, num_warps=max(1, min(8, chunk // 512)))
        return out
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
