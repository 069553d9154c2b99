"""The one- and two-row NF4 products on CUDA (``csrc/nf4_gemv.cu``), decode-step candidates.

``y = x·dequant(W)ᵀ + s·xa·Bᵀ + bias`` for x [M, K], M = 1 or 2, in bf16/fp16 with W in NF4:
the same sum as the Triton gemv (absmax factored out of each 64-weight block, exact fp32
codes, fp32 sums), but each lookup is one warp shuffle instead of a memory read (at two
rows one lookup serves both), and each warp streams 512 contiguous bytes of a weight row a
step. The dispatch times it beside the Triton kernels (``GemvConfig(cuda=True)``: ``bn``
weight rows a warp, ``num_warps`` a block, K split over ``split_k`` warps of a block).
"""
from __future__ import annotations

import torch

from .._ext import built_with_cuda, ext, ptr, stream_of
from ..quant import _DTYPE_CODES
from ..triton_kernels.nf4_configs import CUDA_GEMV_MAX_M, GemvConfig


def weight_fits(w, x: torch.Tensor) -> bool:
    """What the extension's decode kernels (this gemv and ``nf4_decode_mma``) need of an NF4
    weight: 64-weight blocks (K a multiple of 64), 16-byte aligned packed bytes on x's
    device, a power-of-two nested block size if double-quantized (bitsandbytes uses 256),
    and under 2 GiB packed (the kernels' offsets are 32-bit)."""
    return (
        int(w.blocksize) == 64
        and int(w.shape[1]) % 64 == 0
        and w.packed.data_ptr() % 16 == 0
        and w.packed.device == x.device
        and (not w.nested or int(w.nested_blocksize) & (int(w.nested_blocksize) - 1) == 0)
        and int(w.shape[0]) * int(w.shape[1]) // 2 < 2**31
    )


def available(x: torch.Tensor, w) -> bool:
    """Whether the CUDA gemv can take this product: the extension has CUDA, x is one or two
    contiguous, 16-byte aligned bf16/fp16 rows on the GPU of w, and w fits
    (:func:`weight_fits`)."""
    return (
        built_with_cuda()
        and x.is_cuda
        and x.dim() == 2
        and 1 <= x.shape[0] <= CUDA_GEMV_MAX_M
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.is_contiguous()
        and x.data_ptr() % 16 == 0
        and weight_fits(w, x)
    )


def check_epilogue(who: str, x: torch.Tensor, N: int, xa: torch.Tensor | None, lora_b: torch.Tensor | None,
                   bias: torch.Tensor | None) -> None:
    """The LoRA and bias operands of the extension's decode kernels, which read them as raw
    memory in x's element type: each given one must have x's dtype and device, ``lora_b``
    [N, r] with ``xa``'s last dimension r, ``bias`` N values. Raises TypeError/ValueError."""
    for name, t in (("xa", xa), ("lora_b", lora_b), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{who}: {name} is {t.dtype} but x is {x.dtype}; pass it in x's dtype")
        if t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device} but x is on {x.device}")
    if xa is not None and lora_b is not None and (lora_b.dim() != 2 or lora_b.shape[0] != N
                                                  or xa.shape[-1] != lora_b.shape[1]):
        raise ValueError(f"{who}: lora_b must be [N={N}, r] and xa's last dimension r; got lora_b "
                         f"{tuple(lora_b.shape)}, xa {tuple(xa.shape)}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"{who}: bias must have N = {N} values, got shape {tuple(bias.shape)}")


def nf4_gemv_cuda(
    x: torch.Tensor,
    w,
    cfg: GemvConfig,
    *,
    xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x·dequant(w)ᵀ + scale·xa·lora_bᵀ + bias`` for x [M, K], M = 1 or 2; returns [M, N] in
    x's dtype. ``xa`` [M, r] and ``lora_b`` [N, r], ``bias`` [N], all in x's dtype (made
    contiguous)."""
    check_epilogue("nf4_gemv_cuda", x, int(w.shape[0]), xa, lora_b, bias)
    if not available(x, w):
        raise ValueError(f"nf4_gemv_cuda takes one or two contiguous, 16-byte aligned bf16/fp16 CUDA rows and an "
                         f"NF4 weight on its GPU "
                         f"with blocksize 64, K a multiple of 64, a power-of-two nested block size and under 2 GiB "
                         f"packed; got x {tuple(x.shape)} {x.dtype} on {x.device}, weight {tuple(w.shape)} "
                         f"blocksize {w.blocksize} on {w.packed.device}; use the Triton nf4_gemv instead")
    M, K = x.shape
    N = int(w.shape[0])
    if int(w.shape[1]) != K:
        raise ValueError(f"nf4_gemv_cuda: x has K = {K} but the weight has {int(w.shape[1])} columns")
    has_lora = xa is not None and lora_b is not None
    if has_lora and xa.numel() != M * int(lora_b.shape[1]):
        raise ValueError(f"nf4_gemv_cuda: xa must be [M={M}, r={int(lora_b.shape[1])}], got {tuple(xa.shape)}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    rank = int(lora_b.shape[1]) if has_lora else 0
    xa_c = xa.reshape(M, rank).contiguous() if has_lora else None
    b_c = lora_b.contiguous() if has_lora else None
    bias_c = bias.contiguous() if bias is not None else None
    code = w.code if w.code.dtype == torch.float32 else w.code.float()
    nested = w.nested
    with torch.cuda.device(x.device):
        ext().nf4_gemv_cuda(
            ptr(x), M, K, ptr(w.packed), ptr(code),
            0 if nested else ptr(w.absmax), ptr(w.absmax) if nested else 0,
            ptr(w.nested_code) if nested else 0, ptr(w.nested_absmax) if nested else 0,
            float(w.nested_offset or 0.0), int(w.nested_blocksize), N,
            ptr(xa_c), ptr(b_c), rank, float(scale), ptr(bias_c), ptr(y),
            _DTYPE_CODES[x.dtype], int(cfg.bn), int(cfg.num_warps), int(cfg.split_k), stream_of(x))
    return y
