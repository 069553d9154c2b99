"""The few-row NF4 product on the tensor cores (``csrc/nf4_decode_mma.cu``), a decode candidate.

``y = x·dequant(W)ᵀ + s·xa·Bᵀ + bias`` for x [M, K] with 1 ≤ M ≤ 16 in bf16/fp16 and W in
NF4: 16 weight rows a warp as the mma's A (decoded a packed byte at a time from a shared-memory
table), x's rows as its B columns, the absmax factored out of each 64-weight block and applied
to that block's fp32 result. The dispatch times it beside the Triton decode tiles
(``DecodeMmaConfig``: K split over ``split`` warps of a block and ``kb`` blocks of the grid;
at one or two rows ``cols``, the layout whose weight loads are 16 bytes a lane, and with it
``groups``, blocks of 16 warps that share their row groups' K steps evenly, or ``rows`` = 8,
8 weight rows a warp).
"""
from __future__ import annotations

import torch

from .._ext import built_with_cuda, ext, ptr, stream_of
from ..quant import _DTYPE_CODES
from ..triton_kernels.nf4_configs import COLS_MAX_M, DECODE_MMA_MAX_M, FLAT_MAX_GROUPS, DecodeMmaConfig
from .nf4_gemv_cuda import check_epilogue, weight_fits

# Per (device, stream): int32 counters the kernel's K split over the grid leaves at zero.
# One set a stream, so launches on two streams never share them.
_counters: dict[tuple[str, int], torch.Tensor] = {}


def available(x: torch.Tensor, w) -> bool:
    """Whether the tensor-core decode can take this product: the extension has CUDA, x is
    1..16 contiguous 16-byte aligned bf16/fp16 rows on the GPU of w, on a GPU with bf16
    tensor cores (sm80+), and w fits the extension's decode kernels
    (:func:`nf4_gemv_cuda.weight_fits`: blocksize 64, K a multiple of 64, a power-of-two
    nested block size, under 2 GiB packed)."""
    return (
        built_with_cuda()
        and x.is_cuda
        and x.dim() == 2
        and 1 <= x.shape[0] <= DECODE_MMA_MAX_M
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.is_contiguous()
        and x.data_ptr() % 16 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 8
        and weight_fits(w, x)
    )


def _counters_for(x: torch.Tensor, blocks: int) -> torch.Tensor:
    key = (str(x.device), stream_of(x))
    c = _counters.get(key)
    if c is None or c.numel() < blocks:
        c = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=x.device)
        _counters[key] = c
    return c


def nf4_decode_mma(
    x: torch.Tensor,
    w,
    cfg: DecodeMmaConfig,
    *,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x·dequant(w)ᵀ + scale·xa·lora_bᵀ + bias`` for x [M, K], 1 ≤ M ≤ 16; returns [M, N]
    in x's dtype. ``xa`` [M, r] (unit column stride; a column slice of a wider matrix is
    fine), ``lora_b`` [N, r] and ``bias`` [N], all in x's dtype. On a GPU whose shared-memory
    layout the sm_90 build does not expect (a later architecture running its PTX) the result
    is NaN, which the dispatch's result check refuses (csrc/nf4_decode_mma.cu, kTableAddr)."""
    check_epilogue("nf4_decode_mma", x, int(w.shape[0]), xa, lora_b, bias)
    if cfg.cols and x.dim() == 2 and x.shape[0] > COLS_MAX_M:
        raise ValueError(f"nf4_decode_mma: the column layout (cols=True) takes 1 to {COLS_MAX_M} rows of x, got "
                         f"{x.shape[0]}; use cols=False")
    if cfg.rows not in (16, 8) or (cfg.rows == 8 and (not cfg.cols or cfg.groups)):
        raise ValueError(f"nf4_decode_mma: rows (weight rows a warp) must be 16, or 8 with cols=True and no groups; "
                         f"got {cfg}")
    if cfg.groups:
        if not (1 <= cfg.groups <= FLAT_MAX_GROUPS and cfg.cols and cfg.kb == 1):
            raise ValueError(f"nf4_decode_mma: groups (row groups a 16-warp block) must be 1..{FLAT_MAX_GROUPS}, "
                             f"with cols=True and kb=1; got {cfg}")
    elif cfg.split not in (2, 4, 8) or not 1 <= cfg.kb <= 64:
        raise ValueError(f"nf4_decode_mma: split must be 2, 4 or 8 and kb 1..64, got {cfg}")
    if not available(x, w):
        raise ValueError(f"nf4_decode_mma takes 1 to {DECODE_MMA_MAX_M} contiguous, 16-byte aligned bf16/fp16 rows "
                         f"on an sm80+ GPU and an NF4 weight on that GPU with blocksize 64, K a multiple of 64, a "
                         f"power-of-two nested block size and under 2 GiB packed; got x {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}, weight {tuple(w.shape)} blocksize {w.blocksize} on {w.packed.device}; "
                         f"use the Triton nf4_matmul_fwd instead")
    M, K = x.shape
    N = int(w.shape[0])
    if int(w.shape[1]) != K:
        raise ValueError(f"nf4_decode_mma: x has K = {K} but the weight has {int(w.shape[1])} columns")
    has_lora = xa is not None and lora_b is not None
    if has_lora:
        if xa.dim() != 2 or xa.shape[0] != M or xa.stride(1) != 1:
            raise ValueError(f"nf4_decode_mma: xa must be [M={M}, r] with unit column stride; "
                             f"got {tuple(xa.shape)} with strides {xa.stride()}")
        b_c = lora_b.contiguous()
    rank = int(lora_b.shape[1]) if has_lora else 0
    bias_c = bias.contiguous() if bias is not None else None
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    ws = counters = None
    if cfg.kb > 1:
        ws = torch.empty(cfg.kb * M * N, device=x.device, dtype=torch.float32)
        per_block = 8 // cfg.split
        counters = _counters_for(x, ((N + cfg.rows - 1) // cfg.rows + per_block - 1) // per_block)
    code = w.code if w.code.dtype == torch.float32 else w.code.float()
    nested = w.nested
    with torch.cuda.device(x.device):
        ext().nf4_decode_mma_cuda(
            ptr(x), M, K, ptr(w.packed), ptr(code),
            0 if nested else ptr(w.absmax), ptr(w.absmax) if nested else 0,
            ptr(w.nested_code) if nested else 0, ptr(w.nested_absmax) if nested else 0,
            float(w.nested_offset or 0.0), int(w.nested_blocksize), N,
            ptr(xa) if has_lora else 0, int(xa.stride(0)) if has_lora else 0, ptr(b_c) if has_lora else 0, rank,
            float(scale), ptr(bias_c), ptr(y), _DTYPE_CODES[x.dtype], int(cfg.split), int(cfg.kb), bool(cfg.cols),
            int(cfg.groups), int(cfg.rows), ptr(ws), ptr(counters), stream_of(x))
    return y
