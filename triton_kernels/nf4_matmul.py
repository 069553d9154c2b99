"""Forward QLoRA projection: ``Y = X·dequant(W)ᵀ + s·XA·Bᵀ (+ bias)`` with W in NF4.

X [M, K] (bf16/fp16/fp32), W [N, K] in bitsandbytes' NF4 layout, dequantized tile by tile
in registers (no 16-bit copy of W is written), fp32 accumulation. The LoRA term uses the
thin ``XA = X·Aᵀ`` [M, r] computed beforehand: the epilogue adds ``s·XA_tile·B_tileᵀ``
with one more small dot. Up to three weights that read the same X (q, k, v; or gate and
up) run in one launch: the grid's column tiles walk W0's outputs, then W1's, then W2's,
each written to its own output tensor.

Decode shapes (M ≤ 64) are bound by reading the 4-bit weight and by latency; they may
split K over ``SPLIT_K`` programs, so more programs stream the weight at once. Each
leaves an fp32 partial tile in a workspace and the last to finish its tile (a counter
per tile) sums them in split order and writes the output: one launch, deterministic.

``W_AS_A`` computes the transposed tile ``Yᵀ = W·Xᵀ`` so the dequantized tile is the
dot's first operand, which Hopper's wgmma can take straight from registers; the other
form stages it through shared memory. Which is faster is measured (nf4_configs).

The backward of this product is the transposed kernel in ``nf4_matmul_t.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_configs import MatmulConfig
from .nf4_tile import lut_for, nf4_tile, use_asm
from .split_k import split_counters, split_k_sum


@triton.jit
def _pick(cond, a, b):
    """Scalar select that keeps the type of ``a`` (pointers and numbers alike)."""
    if cond:
        r = a
    else:
        r = b
    return r


@triton.jit(do_not_specialize=["n0", "r0", "c0", "n1", "r1", "c1", "n2", "r2", "c2", "M"])
def _nf4_fwd_kernel(
    x_ptr, stride_xm, xa_ptr, stride_xam, ws_ptr, cnt_ptr,
    code_ptr, ncode_ptr,
    w0, am0, nam0, off0, y0, b0, bias0, s0, n0, r0, c0,
    w1, am1, nam1, off1, y1, b1, bias1, s1, n1, r1, c1,
    w2, am2, nam2, off2, y2, b2, bias2, s2, n2, r2, c2,
    M, K,
    NUM_SEG: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, W_AS_A: tl.constexpr, PREC: tl.constexpr,
    ASM: tl.constexpr = False, LUT: tl.constexpr = 0,
):
    # ---- which output tile: grouped ordering over (m tiles, column tiles of all segments)
    pid = tl.program_id(0)
    t0 = tl.cdiv(n0, BN)
    t1 = tl.cdiv(n1, BN)
    t2 = tl.cdiv(n2, BN)
    tiles_n = t0
    if NUM_SEG > 1:
        tiles_n += t1
    if NUM_SEG > 2:
        tiles_n += t2
    tiles_m = tl.cdiv(M, BM)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    # ---- which segment that column tile belongs to (scalar selects, no divergence)
    w_ptr = w0
    am_ptr = am0
    nam_ptr = nam0
    off = off0
    y_ptr = y0
    b_ptr = b0
    bias_ptr = bias0
    scale = s0
    N = n0
    r = r0
    col = c0
    tile = pid_n
    if NUM_SEG > 1:
        in1 = pid_n >= t0
        w_ptr = _pick(in1, w1, w_ptr)
        am_ptr = _pick(in1, am1, am_ptr)
        nam_ptr = _pick(in1, nam1, nam_ptr)
        off = _pick(in1, off1, off)
        y_ptr = _pick(in1, y1, y_ptr)
        b_ptr = _pick(in1, b1, b_ptr)
        bias_ptr = _pick(in1, bias1, bias_ptr)
        scale = _pick(in1, s1, scale)
        N = _pick(in1, n1, N)
        r = _pick(in1, r1, r)
        col = _pick(in1, c1, col)
        tile = _pick(in1, pid_n - t0, tile)
    if NUM_SEG > 2:
        in2 = pid_n >= t0 + t1
        w_ptr = _pick(in2, w2, w_ptr)
        am_ptr = _pick(in2, am2, am_ptr)
        nam_ptr = _pick(in2, nam2, nam_ptr)
        off = _pick(in2, off2, off)
        y_ptr = _pick(in2, y2, y_ptr)
        b_ptr = _pick(in2, b2, b_ptr)
        bias_ptr = _pick(in2, bias2, bias_ptr)
        scale = _pick(in2, s2, scale)
        N = _pick(in2, n2, N)
        r = _pick(in2, r2, r)
        col = _pick(in2, c2, col)
        tile = _pick(in2, pid_n - t0 - t1, tile)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tile * BN + tl.arange(0, BN)
    # Clamped rows read valid memory; their results are dropped by the store mask.
    # 64-bit row offsets: M·K can pass 2³¹ on long sequences.
    rm = tl.minimum(offs_m, M - 1).to(tl.int64)
    rn = tl.minimum(offs_n, N - 1)

    # ---- this program's share of K (all of it unless split)
    k_tiles = K // BK
    if SPLIT_K == 1:
        k_first = 0
        k_count = k_tiles
    else:
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        k_first = tl.program_id(1) * per_split
        k_count = tl.minimum(per_split, k_tiles - k_first)

    k0 = k_first * BK
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + tl.arange(0, BK))[None, :]
    w_ptrs = w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, BK // 2))[None, :]
    blk = rn[:, None] * (K // 64) + (k0 // 64 + tl.arange(0, BK // 64))[None, :]

    if W_AS_A:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_count):
        x = tl.load(x_ptrs)
        w = nf4_tile(w_ptrs, blk, am_ptr, nam_ptr, ncode_ptr, code_ptr, off,
                     BN, BK, DOUBLE_QUANT, NESTED_BLOCK, x.dtype, ASM, LUT)
        if W_AS_A:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PREC)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        x_ptrs += BK
        w_ptrs += BK // 2
        blk += BK // 64
    if W_AS_A:
        acc = tl.trans(acc)
    # ---- split K: each program leaves its fp32 partial tile in the workspace; the last of
    # a tile's programs to arrive (a counter per tile) adds them in split order, so the sum
    # is deterministic and the output is written once, in its own dtype, by one launch.
    last = True
    if SPLIT_K > 1:
        local = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        acc, last = split_k_sum(acc, ws_ptr, local, cnt_ptr, BM * BN, SPLIT_K)
    if last:
        # ---- epilogue: LoRA (scale folded into B; the dot accumulates into acc) and bias
        if HAS_LORA:
            offs_r = tl.arange(0, BR)
            r_mask = offs_r < r
            xa = tl.load(xa_ptr + rm[:, None] * stride_xam + (col + offs_r)[None, :],
                         mask=r_mask[None, :], other=0.0)
            bt = tl.load(b_ptr + rn[:, None] * r + offs_r[None, :], mask=r_mask[None, :], other=0.0)
            bt = (bt.to(tl.float32) * scale).to(xa.dtype)
            acc = tl.dot(xa, tl.trans(bt), acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


class Segment:
    """One weight of a launch: an NF4 weight's raw fields plus its LoRA B, scale and bias."""

    __slots__ = ("packed", "absmax", "nested_absmax", "nested_offset", "n", "lora_b", "scale", "bias", "r", "col")

    def __init__(self, w, lora_b: torch.Tensor | None, scale: float, bias: torch.Tensor | None, col: int):
        self.packed = w.packed
        self.absmax = w.absmax
        self.nested_absmax = w.nested_absmax if w.nested_absmax is not None else w.absmax
        self.nested_offset = float(w.nested_offset or 0.0)
        self.n = int(w.shape[0])
        self.lora_b = lora_b
        self.r = 0 if lora_b is None else int(lora_b.shape[1])
        self.scale = float(scale)
        self.bias = bias
        self.col = col


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def nf4_matmul_fwd(
    x: torch.Tensor,
    weights: list,
    cfg: MatmulConfig,
    *,
    xa: torch.Tensor | None = None,
    lora_b: list[torch.Tensor | None] | None = None,
    scales: list[float] | None = None,
    xa_cols: list[int] | None = None,
    biases: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """``[x·dequant(w_i)ᵀ + s_i·xa[:, cols_i]·B_iᵀ + bias_i for each w_i]`` in one launch.

    x [M, K] contiguous in its last dim; each ``w_i`` an NF4 weight of shape [N_i, K];
    ``xa`` [M, Σr_i] (x's dtype), ``lora_b[i]`` [N_i, r_i] contiguous (x's dtype) or None;
    ``biases[i]`` [N_i] or None. K must be a multiple of ``cfg.bk`` (and of 64).
    """
    M, K = x.shape
    nseg = len(weights)
    if xa is not None:
        xa = xa.to(x.dtype)
    if not 1 <= nseg <= 3:
        raise ValueError(f"nf4_matmul_fwd takes 1 to 3 weights, got {nseg}")
    if K % cfg.bk or K % 64 or any(int(w.shape[1]) != K for w in weights):
        raise ValueError(f"nf4_matmul_fwd: x has K = {K}; every weight must have K columns and K must be a "
                         f"multiple of 64 and of the tile's bk = {cfg.bk}")
    lora_b = lora_b or [None] * nseg
    scales = scales or [1.0] * nseg
    biases = biases or [None] * nseg
    xa_cols = xa_cols or [0] * nseg
    has_lora = xa is not None and any(b is not None for b in lora_b)
    has_bias = any(b is not None for b in biases)
    # One pointer type per argument slot across segments: everything in x's dtype.
    lora_b = [None if b is None else b.to(x.dtype).contiguous() for b in lora_b]
    biases = [None if b is None else b.to(x.dtype) for b in biases]
    segs = [Segment(w, lora_b[i] if has_lora else None, scales[i], biases[i], xa_cols[i]) for i, w in enumerate(weights)]
    split = cfg.split_k
    outs = [torch.empty((M, s.n), device=x.device, dtype=x.dtype) for s in segs]
    for s in segs:
        if has_bias and s.bias is None:
            s.bias = torch.zeros(s.n, device=x.device, dtype=x.dtype)
    # Unused segment slots repeat segment 0 with zero columns: they get no tiles.
    args = []
    for i in range(3):
        s = segs[i] if i < nseg else segs[0]
        y = outs[i] if i < nseg else outs[0]
        b = s.lora_b if s.lora_b is not None else x  # never read when r == 0
        bias = s.bias if has_bias else x
        args += [s.packed, s.absmax, s.nested_absmax, s.nested_offset, y, b, bias, s.scale,
                 s.n if i < nseg else 0, s.r if i < nseg else 0, s.col]
    w0 = weights[0]
    rmax = max([s.r for s in segs] + [1])
    tiles = triton.cdiv(M, cfg.bm) * sum(triton.cdiv(s.n, cfg.bn) for s in segs)
    if split > 1:
        ws = torch.empty(split * tiles * cfg.bm * cfg.bn, device=x.device, dtype=torch.float32)
        cnt = split_counters(x.device, tiles)
    else:
        ws, cnt = x, x  # never read
    _nf4_fwd_kernel[(tiles, split)](
        x, x.stride(0), xa if has_lora else x, xa.stride(0) if has_lora else 0, ws, cnt,
        w0.code, w0.nested_code if w0.nested_code is not None else w0.code,
        *args,
        M, K,
        NUM_SEG=nseg, HAS_LORA=has_lora, HAS_BIAS=has_bias,
        DOUBLE_QUANT=w0.absmax.dtype == torch.uint8, NESTED_BLOCK=int(w0.nested_blocksize or 256),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, BR=max(16, _next_pow2(rmax)),
        GROUP_M=cfg.group_m, SPLIT_K=split, W_AS_A=cfg.w_as_a,
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        ASM=use_asm(x),
        LUT=lut_for(w0, x, cfg.bn, cfg.bk, cfg.num_warps, cfg.w_as_a),
        **cfg.launch_options(),
    )
    if split > 1:
        outs = [o.to(x.dtype) for o in outs]
    return outs
