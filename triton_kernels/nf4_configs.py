"""Tile configurations of the NF4 matmul kernels, per GPU family and shape class.

Each list is the constrained search space of ``fastqlora.ops.nf4_dispatch``: on first use
of a shape it times these (plus "dequantize + cuBLAS") and keeps the fastest; the first
entry is used when timing is off or under the interpreter. Why these shapes:

* prefill / training (M > 64) is compute bound. The dequantization of a [BN, BK] weight
  tile costs the same whatever BM is, so its share of the time falls as 1/BM: the lists
  favour BM = 256 on Hopper, whose tensor cores outrun the CUDA cores ~15×.
* decode (M ≤ 64) is bound by reading 0.5 byte per weight: small BM (M padded to 16),
  K split over programs until about four waves stream the weight at once.

Fields follow the forward kernel: ``bn`` output columns, ``bk`` reduction. For the
transposed (backward) kernel ``bn`` is the reduction and ``bk`` the output columns; in
both the dequantized tile is [bn, bk] and ``bk`` is a multiple of 64 that divides K.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MatmulConfig:
    bm: int
    bn: int
    bk: int
    group_m: int = 8
    split_k: int = 1
    w_as_a: bool = False
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int = 0  # > 0: cap registers a thread (lets two 8-warp programs share an SM)

    def launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts

    def short(self) -> str:
        s = f"{self.bm}x{self.bn}x{self.bk} w{self.num_warps} s{self.num_stages}"
        if self.maxnreg:
            s += f" r{self.maxnreg}"
        if self.w_as_a:
            s += " WA"
        if self.split_k > 1:
            s += f" sk{self.split_k}"
        return s


@dataclass(frozen=True)
class GemvConfig:
    """The tensor-core-free one-row kernel (nf4_gemv.py): bn weight rows per program, one
    64-weight block per step, K split over split_k programs. With ``cuda`` the extension's
    kernel (csrc/nf4_gemv.cu) instead: bn weight rows a warp, num_warps warps a block, K
    split over split_k warps of the block."""

    bn: int
    split_k: int = 1
    num_warps: int = 4
    bm: int = 1  # rows handled (always one)
    bk: int = 64  # weights a step
    cuda: bool = False

    def short(self) -> str:
        if self.cuda:
            return f"cuda gemv r{self.bn} w{self.num_warps}" + (
                f" sk{self.split_k}" if self.split_k > 1 else "")
        s = f"gemv {self.bn} w{self.num_warps}"
        if self.split_k > 1:
            s += f" sk{self.split_k}"
        return s


@dataclass(frozen=True)
class DecodeMmaConfig:
    """The extension's tensor-core decode kernel (csrc/nf4_decode_mma.cu) for 1 <= M <= 16:
    16 weight rows a warp, 8 warps a block, K split over ``split`` warps of a block and over
    ``kb`` blocks of the grid. ``cols`` (M <= 2): the column layout, 16-byte weight loads with
    each absmax block of a step in its own columns of the mma's B (see the kernel).
    ``groups`` > 0 (with ``cols``, ``kb`` = 1): blocks of 16 warps, each taking that many row
    groups of 16 weight rows and sharing their K steps evenly over its warps (``split`` unused).
    ``rows`` = 8 (with ``cols``, ``groups`` = 0): 8 weight rows a warp instead of 16, twice
    the row groups (narrow weights fill more SMs)."""

    split: int
    kb: int = 1
    cols: bool = False
    groups: int = 0
    rows: int = 16

    def short(self) -> str:
        if self.groups:
            return f"cuda mma g{self.groups}" + (" cols" if self.cols else "")
        return (f"cuda mma s{self.split}" + (f" kb{self.kb}" if self.kb > 1 else "") + (" cols" if self.cols else "")
                + (f" r{self.rows}" if self.rows != 16 else ""))


C = MatmulConfig

# ---- forward, Y = X·Wᵀ: bm, bn (out), bk (reduction)
# Prefill (H200 sweep, bench_nf4_matmul.py --sweep, 2026-12-01): the inline-PTX decode
# costs ~6.5 instructions a weight, so a [bn, 64] tile costs ~bn·64·6.5/32 warp
# instructions against bm·bn·64·2/4096 tensor-core cycles, and bm = 256 amortizes it best.
# Triton waits for each wgmma before the next decode, so the overlap comes from a second
# program on the SM: maxnreg 128 lets two 8-warp programs share one (630 -> 473 µs at
# 4096³). Still 0.37x cuBLAS: ncu shows the L1/TEX unit 70% busy (the per-weight table
# reads beside wgmma's shared-memory operand traffic) and 0.33 issues per scheduler, so
# the dispatch keeps "dequantize + cuBLAS" for these shapes. The W_AS_A and 16-warp
# tiles measured 583-660 µs and were dropped from the list.
_FWD_PREFILL = {
    "hopper": [
        C(256, 64, 64, 8, 1, False, 8, 3, 128),
        C(128, 128, 64, 8, 1, False, 8, 3, 128),
        C(256, 64, 64, 8, 1, False, 8, 2, 128),
    ],
    "ampere": [
        C(128, 128, 64, 8, 1, False, 8, 3),
        C(128, 64, 64, 8, 1, False, 4, 3),
        C(128, 128, 64, 8, 1, True, 8, 3),
        C(256, 64, 64, 8, 1, True, 8, 3),
    ],
}
# bm is replaced by M rounded up to a power of two in [16, 64].
# Split-K is one launch (the tile's last program sums the partials), so splitting costs
# only a small fp32 workspace. The fastest of a CUDA-graph sweep on the H200 (7 tiles x
# splits 1/2/4/8, M = 16, benchmarks/sweep_nf4_decode.py), per Llama-3-8B shape.
_FWD_DECODE = [
    C(16, 64, 128, 1, 4, False, 4, 3),
    C(16, 64, 128, 1, 8, False, 4, 3),
    C(16, 64, 256, 1, 8, False, 4, 3),
    C(16, 64, 256, 1, 4, False, 4, 3),
    C(16, 32, 256, 1, 4, False, 4, 3),
    C(16, 32, 512, 1, 1, False, 4, 3),
]

# One row only (see nf4_gemv.py for why not more).
GEMV_MAX_M = 1  # the Triton gemv: one row
_GEMV = [GemvConfig(64, 16, 2), GemvConfig(64, 32, 2), GemvConfig(64, 8, 2)]
# The extension's CUDA gemv (bf16/fp16 x, built with CUDA): (weight rows a warp, K split over
# warps, warps a block). The H200 sweep's fastest per Llama-3-8B shape
# (results/nf4_decode_m1_cuda_gemv_loads_h200.json, ofs32 alike): q/o r8 sk4 w4/w8, k/v r2 sk4 w8/w4,
# gate/up r8 sk2 w4, r8 w4, r8 w8, down r8 sk4 w4/w8; and one config for each other row count.
_CUDA_GEMV = [GemvConfig(r, sk, w, cuda=True) for r, sk, w in (
    (8, 4, 4), (8, 4, 8), (2, 4, 8), (2, 4, 4), (8, 2, 4), (8, 1, 4), (8, 1, 8), (4, 2, 8), (1, 1, 8))]
# Two rows of x (each decoded code serves both): 2, 4 or 8 weight rows a warp, never one
# (128 registers at 2-4 weight rows a warp, 191 at 8); first the H200 sweep's fastest at M = 2
# (results/nf4_decode_m2_gemv_sweep_s15_h200.json: k/v r4 sk4 w4/w8, r2 sk4; q/o, down r8 sk2 w4).
CUDA_GEMV_MAX_M = 2
_CUDA_GEMV2 = [GemvConfig(r, sk, w, cuda=True) for r, sk, w in (
    (4, 4, 4), (4, 4, 8), (2, 4, 8), (2, 4, 4), (8, 2, 4), (4, 2, 8), (2, 2, 8), (8, 4, 4), (4, 1, 8))]

# The tensor-core decode (csrc/nf4_decode_mma.cu), row layout, 2 <= M <= 16 (at one row it
# ties the gemv at best; the column layout below is the one-row candidate). The H200
# sweep's fastest (split, kb) per Llama-3-8B shape at M = 2-16
# (results/nf4_decode_table_s16_s8_h200.json): q/o, down and k/v (M >= 4) s8, gate/up s2; s8
# first, what the dispatch uses untimed. The rest were the fastest of earlier sweeps
# (results/nf4_decode_mma_table_h200.json) and stay for other shapes.
DECODE_MMA_MAX_M = 16
_CUDA_MMA = [DecodeMmaConfig(s, kb) for s, kb in ((8, 1), (2, 1), (4, 1), (4, 2), (2, 4), (4, 4), (2, 8), (8, 2), (8, 4))]
# The column layout at one and two rows of x (whole 128-byte lines a load since the eighteenth
# session). H200 sweep of that build (results/nf4_decode_table_s18_h200.json, graph-timed, the
# fastest candidate, M = 1 / 2): q/o s4 5.3 / 5.7 µs, k/v s8 with 8 weight rows a warp 3.4 / 3.7
# (the gemv 3.5 at one row), gate/up the 16-warp blocks (G = 7 on 132 SMs) 12.2 / 13.1 (s2
# 12.6 / 13.6), down s8 11.3 / 12.3. A grid split (kb > 1) was slower on every shape (its
# partials' round trip through L2: q/o M = 2 s2 kb4 7.6 against s4 5.9 in the seventeenth
# session); two stay for shapes with few row groups. The 16-warp blocks (flat_groups, added by
# decode_mma_candidates with the weight's rows and the SM count) lost everywhere else: at one or
# two steps a warp their per-warp work doubles (results/nf4_decode_flat_s18_h200.json).
COLS_MAX_M = 2
FLAT_MAX_GROUPS = 16  # csrc/nf4_decode_mma.cu: kFlatMaxGroups
_CUDA_MMA_COLS = [DecodeMmaConfig(s, kb, cols=True) for s, kb in ((8, 1), (4, 1), (2, 1), (4, 2), (2, 4))]
# 8 weight rows a warp: twice the blocks, for weights with few row groups (1024 x 4096: 128)
_CUDA_MMA_COLS += [DecodeMmaConfig(s, 1, cols=True, rows=8) for s in (8, 4)]

# ---- transposed, dX = dY·W: bm, bn (reduction), bk (out); the sweep's three fastest.
_T_LARGE = {
    "hopper": [
        C(256, 64, 64, 8, 1, False, 8, 3, 128),
        C(256, 64, 64, 8, 1, False, 8, 2, 128),
        C(128, 64, 128, 8, 1, True, 4, 4),
    ],
    "ampere": [
        C(128, 64, 128, 8, 1, True, 8, 3),
        C(256, 64, 64, 8, 1, True, 8, 3),
        C(64, 64, 128, 8, 1, False, 4, 3),
    ],
}
_T_SMALL = [
    C(16, 64, 128, 8, 1, False, 4, 3),
    C(16, 64, 64, 8, 1, True, 4, 3),
    C(16, 128, 64, 8, 1, False, 4, 3),
]

# Large enough tiles that the interpreter runs few programs; small enough for tests.
INTERPRET_FWD = C(32, 64, 64, 4, 1, False, 4, 1)
INTERPRET_T = C(32, 64, 64, 4, 1, False, 4, 1)
INTERPRET_GEMV = GemvConfig(64, 1, 4)

DECODE_MAX_M = 64


def family(capability: tuple[int, int]) -> str:
    """"hopper" for sm90+, "ampere" for sm80-89 (and older, which Triton may not run)."""
    return "hopper" if capability[0] >= 9 else "ampere"


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    p = lo
    while p < v and p < hi:
        p *= 2
    return p


def gemv_candidates(M: int, N: int, K: int, cuda: bool = False) -> list[GemvConfig]:
    """Tensor-core-free configs for one weight [N, K]: at one row the Triton gemv's, and first
    the extension's CUDA gemv's when ``cuda`` (it can take this product); at two rows the CUDA
    gemv's two-row kernels only (when ``cuda``); none above."""
    if M <= GEMV_MAX_M:
        cands = (_CUDA_GEMV if cuda else []) + _GEMV
    elif M <= CUDA_GEMV_MAX_M and cuda:
        cands = list(_CUDA_GEMV2)
    else:
        return []
    return [c for c in cands if K % c.bk == 0]


def flat_groups(n: int, sms: int) -> int:
    """Row groups (16 weight rows) a 16-warp block of the tensor-core decode takes so that an
    [n, K] product is one wave of about equal blocks on ``sms`` SMs: ceil(groups / sms), 1..16."""
    groups = -(-n // 16)
    return max(1, min(FLAT_MAX_GROUPS, -(-groups // max(sms, 1))))


def decode_mma_candidates(M: int, cuda: bool, n: int = 0, sms: int = 0) -> list[DecodeMmaConfig]:
    """The tensor-core decode's configs when ``cuda`` (the extension can take the product):
    the column layout's at M <= COLS_MAX_M (with ``n`` weight rows and ``sms`` SMs given, first
    the 16-warp blocks of :func:`flat_groups` row groups), the row layout's at
    2 <= M <= DECODE_MMA_MAX_M; none otherwise."""
    if not cuda or not 1 <= M <= DECODE_MMA_MAX_M:
        return []
    cols = list(_CUDA_MMA_COLS) if M <= COLS_MAX_M else []
    if cols and n > 0 and sms > 0:
        cols.insert(0, DecodeMmaConfig(0, cols=True, groups=flat_groups(n, sms)))
    return cols + (list(_CUDA_MMA) if M >= 2 else [])


def forward_candidates(capability: tuple[int, int], M: int, n_total: int, K: int) -> list[MatmulConfig]:
    """Configs worth timing for ``Y[M, n_total] = X[M, K]·Wᵀ`` on this GPU (n_total: the
    output widths of one launch together; the tables do not depend on it today)."""
    if M <= DECODE_MAX_M:
        bm = _pow2_at_least(M, 16, 64)
        out = [replace(c, bm=bm) for c in _FWD_DECODE]
    else:
        out = list(_FWD_PREFILL[family(capability)])
    return [c for c in out if K % c.bk == 0]


def transposed_candidates(capability: tuple[int, int], M: int, K: int) -> list[MatmulConfig]:
    """Configs worth timing for ``dX[M, K] = dY·W`` on this GPU."""
    if M <= DECODE_MAX_M:
        bm = _pow2_at_least(M, 16, 64)
        out = [replace(c, bm=bm) for c in _T_SMALL]
    else:
        out = list(_T_LARGE[family(capability)])
    return [c for c in out if K % c.bk == 0]
