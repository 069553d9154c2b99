"""The few-row NF4 product on the tensor cores (``csrc/nf4_decode_mma.cu``), a decode candidate.

``y = x·dequant(W)ᵀ + s·xa·Bᵀ + bias`` for x [M, K] with 1 ≤ M ≤ 16 in bf16/fp16 and W in
NF4: 16 weight rows a warp as the mma's A (decoded a packed byte at a time from a shared-memory
table), x's rows as its B columns, the absmax factored out of each 64-weight block and applied
to that block's fp32 result. The dispatch times it beside the Triton decode tiles
(``DecodeMmaConfig``: K split over ``split`` warps of a block and ``kb`` blocks of the grid;
at one or two rows ``cols``, the layout whose weight loads are 16 bytes a lane, and with it
``groups``, blocks of 16 warps that share their row groups' K steps evenly, or ``rows`` = 8,
8 weight rows a warp). :func:`nf4_decode_mma_many` runs several weights of one x (q, k, v;
gate, up) in one launch, each weight's blocks a run of the grid.
"""
from __future__ import annotations

import torch

from .._ext import built_with_cuda, ext, ptr, stream_of
from ..quant import _DTYPE_CODES
from ..triton_kernels.nf4_configs import COLS_MAX_M, DECODE_MMA_MAX_M, FLAT_MAX_GROUPS, DecodeMmaConfig
from .dispatch import shared_decode_launch_enabled
from .nf4_gemv_cuda import check_epilogue, weight_fits
from .nf4_linear import check_lengths

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


MAX_PARTS = 3  # weights one launch takes (csrc/nf4_decode_mma.cu, kMaxParts)


def shares_launch(weights: list, cfg: DecodeMmaConfig) -> bool:
    """Whether :func:`nf4_decode_mma_many` runs these weights (of one x) in one launch: 2 to
    MAX_PARTS of them, the same K, all with nested absmax or all plain, and no K split over the
    grid (``cfg.kb`` = 1: its partials are one weight's). Otherwise it launches once a weight."""
    return (
        2 <= len(weights) <= MAX_PARTS
        and cfg.kb == 1
        and len({int(w.shape[1]) for w in weights}) == 1
        and len({bool(w.nested) for w in weights}) == 1
    )


def _check(x: torch.Tensor, w, cfg: DecodeMmaConfig, xa, lora_b, bias) -> None:
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
    if int(w.shape[1]) != x.shape[1]:
        raise ValueError(f"nf4_decode_mma: x has K = {x.shape[1]} but the weight has {int(w.shape[1])} columns")
    if xa is not None and lora_b is not None and (xa.dim() != 2 or xa.shape[0] != x.shape[0] or xa.stride(1) != 1):
        raise ValueError(f"nf4_decode_mma: xa must be [M={x.shape[0]}, r] with unit column stride; "
                         f"got {tuple(xa.shape)} with strides {xa.stride()}")


def _part(x: torch.Tensor, w, xa, lora_b, scale: float, bias, keep: list) -> tuple:
    """The binding's tuple for one weight and its output (``keep`` holds the temporaries the
    launch reads until it is queued)."""
    has_lora = xa is not None and lora_b is not None
    b_c = lora_b.contiguous() if has_lora else None
    bias_c = bias.contiguous() if bias is not None else None
    code = w.code if w.code.dtype == torch.float32 else w.code.float()
    y = torch.empty((x.shape[0], int(w.shape[0])), device=x.device, dtype=x.dtype)
    keep += [b_c, bias_c, code]
    nested = w.nested
    return (ptr(w.packed), ptr(code), 0 if nested else ptr(w.absmax), ptr(w.absmax) if nested else 0,
            ptr(w.nested_code) if nested else 0, ptr(w.nested_absmax) if nested else 0,
            float(w.nested_offset or 0.0), int(w.nested_blocksize), int(w.shape[0]),
            ptr(xa) if has_lora else 0, ptr(b_c) if has_lora else 0, int(lora_b.shape[1]) if has_lora else 0,
            float(scale), ptr(bias_c), ptr(y)), y


def _launch(x: torch.Tensor, parts: list[tuple], cfg: DecodeMmaConfig, xa_stride: int) -> None:
    M, K = x.shape
    ws = counters = None
    if cfg.kb > 1:  # one weight (shares_launch)
        N = parts[0][8]
        ws = torch.empty(cfg.kb * M * N, device=x.device, dtype=torch.float32)
        per_block = 8 // cfg.split
        counters = _counters_for(x, ((N + cfg.rows - 1) // cfg.rows + per_block - 1) // per_block)
    with torch.cuda.device(x.device):
        ext().nf4_decode_mma_parts_cuda(
            ptr(x), M, K, parts, int(xa_stride), _DTYPE_CODES[x.dtype], int(cfg.split), int(cfg.kb), bool(cfg.cols),
            int(cfg.groups), int(cfg.rows), ptr(ws), ptr(counters), stream_of(x))


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
    _check(x, w, cfg, xa, lora_b, bias)
    keep: list = []
    part, y = _part(x, w, xa, lora_b, scale, bias, keep)
    _launch(x, [part], cfg, xa.stride(0) if xa is not None and lora_b is not None else 0)
    return y


def nf4_decode_mma_many(
    x: torch.Tensor,
    weights: list,
    cfg: DecodeMmaConfig,
    *,
    xas: list[torch.Tensor | None] | None = None,
    lora_bs: list[torch.Tensor | None] | None = None,
    scales: list[float] | None = None,
    biases: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """:func:`nf4_decode_mma` for several weights of one x (q, k, v; gate, up), in one launch
    when :func:`shares_launch` allows (each weight's blocks are the ones its own launch would
    run, so each output is bit for bit its own launch's), else one launch a weight (and always
    with ``FASTQLORA_DECODE_SHARED_LAUNCH=0``). The LoRA terms' ``xas`` must then share one row
    stride (column slices of one matrix)."""
    n = len(weights)
    xas = xas or [None] * n
    lora_bs = lora_bs or [None] * n
    scales = scales or [1.0] * n
    biases = biases or [None] * n
    check_lengths("nf4_decode_mma_many", n, xas=xas, lora_bs=lora_bs, scales=scales, biases=biases)
    lora = [xa is not None and b is not None for xa, b in zip(xas, lora_bs)]
    strides = {xa.stride(0) for xa, on in zip(xas, lora) if on}
    if not shares_launch(weights, cfg) or len(strides) > 1 or not shared_decode_launch_enabled():
        return [nf4_decode_mma(x, w, cfg, xa=xa, lora_b=b, scale=s, bias=bias)
                for w, xa, b, s, bias in zip(weights, xas, lora_bs, scales, biases)]
    for w, xa, b, bias in zip(weights, xas, lora_bs, biases):
        _check(x, w, cfg, xa, b, bias)
    keep: list = []
    parts, ys = [], []
    for w, xa, b, s, bias in zip(weights, xas, lora_bs, scales, biases):
        part, y = _part(x, w, xa, b, s, bias, keep)
        parts.append(part)
        ys.append(y)
    _launch(x, parts, cfg, strides.pop() if strides else 0)
    return ys
