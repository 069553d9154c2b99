"""Products with a frozen base weight, NF4 or dense 16-bit, as the LoRA ops need them.

``frozen_matmul``   ``Yᵢ = X·Wᵢᵀ + sᵢ·XA[:, colsᵢ]·Bᵢᵀ + biasᵢ`` for up to three weights
                    sharing X (q, k, v; gate, up).
``frozen_matmul_t`` ``dX = Σᵢ dYᵢ·Wᵢ + P·A_cat`` (the input gradient of the above).

An NF4 weight (:class:`fastqlora.quant.NF4Tensor`) goes, per shape and GPU, to the fused
Triton kernel (dequantization inside the product, LoRA in the epilogue) or to "dequantize
into a reused buffer + cuBLAS", whichever ``nf4_dispatch`` measured faster. The buffer is
one per (device, dtype), sized to the largest weight; stream order makes reuse safe, so
these ops must not run on two streams at once. Dense weights, CPU tensors without the
interpreter, weights whose K is not a multiple of 64 and non-64 block sizes take the plain
path. No autograd here: these are the pieces the autograd Functions call.
"""
from __future__ import annotations

import torch

from ..quant import NF4Tensor
from . import nf4_dispatch
from .dispatch import use_triton


def check_lengths(who: str, n: int, **lists) -> None:
    """Each per-weight list given must have one entry a weight (n); a shorter one would drop
    outputs silently in a zip. Raises ValueError naming the list."""
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{who}: {name} has {len(lst)} entries for {n} weights; pass one a weight (None for none)")


def is_nf4(w) -> bool:
    return isinstance(w, NF4Tensor)


def out_features(w) -> int:
    return int(w.shape[0])


_workspaces: dict[tuple, torch.Tensor] = {}


def _workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One flat buffer per (device, dtype), grown to the largest weight: every dequantized
    copy lives here, and stream order keeps a use from overlapping the next fill."""
    key = (str(device), dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=device, dtype=dtype)
        _workspaces[key] = buf
    return buf[:numel]


def dense(w, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense [N, K] tensor of ``dtype``; NF4 goes into the shared buffer."""
    if not is_nf4(w):
        return w if w.dtype == dtype else w.to(dtype)
    shape = tuple(int(s) for s in w.shape)
    out = _workspace(w.packed.device, dtype, shape[0] * shape[1])
    return w.dequantize(dtype, out=out)  # fastqlora._C: CUDA kernel on the current stream, or CPU


def _fusable(weights: list, x: torch.Tensor) -> bool:
    if not use_triton(x) or not all(is_nf4(w) for w in weights):
        return False
    K = int(weights[0].shape[1])
    return (
        K % 64 == 0
        and all(int(w.blocksize) == 64 and int(w.shape[1]) == K for w in weights)
        and all(w.packed.device == x.device for w in weights)
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def _plain_fwd(x, weights, xa, lora_b, scales, biases, xa_cols) -> list[torch.Tensor]:
    outs = []
    for i, w in enumerate(weights):
        y = x @ dense(w, x.dtype).t()
        b = lora_b[i]
        if xa is not None and b is not None:
            r = b.shape[1]
            y.addmm_(xa[:, xa_cols[i]:xa_cols[i] + r], b.t(), alpha=scales[i])
        if biases[i] is not None:
            y += biases[i]
        outs.append(y)
    return outs


def frozen_matmul(
    x: torch.Tensor,
    weights: list,
    *,
    xa: torch.Tensor | None = None,
    lora_b: list[torch.Tensor | None] | None = None,
    scales: list[float] | None = None,
    biases: list[torch.Tensor | None] | None = None,
    xa_cols: list[int] | None = None,
) -> list[torch.Tensor]:
    """``[x·Wᵢᵀ + sᵢ·xa[:, colsᵢ:colsᵢ+rᵢ]·Bᵢᵀ + biasᵢ]`` for x [M, K] with unit last stride.

    ``lora_b[i]`` [N_i, r_i] and ``xa`` [M, Σr] must be in x's dtype; biases in x's dtype.
    The dispatch picks one path for the list; with the tensor-core decode (a few rows) the
    weights run in one launch where they can share it (``nf4_decode_mma_many``).
    """
    n = len(weights)
    lora_b = lora_b or [None] * n
    scales = scales or [1.0] * n
    biases = biases or [None] * n
    xa_cols = xa_cols or [0] * n
    check_lengths("frozen_matmul", n, lora_b=lora_b, scales=scales, biases=biases, xa_cols=xa_cols)
    if not _fusable(weights, x):
        return _plain_fwd(x, weights, xa, lora_b, scales, biases, xa_cols)
    from ..triton_kernels.nf4_configs import DecodeMmaConfig, GemvConfig
    from ..triton_kernels.nf4_gemv import nf4_gemv
    from ..triton_kernels.nf4_matmul import nf4_matmul_fwd
    from .nf4_decode_mma import available as cuda_mma_available
    from .nf4_decode_mma import nf4_decode_mma_many
    from .nf4_gemv_cuda import available as cuda_gemv_available
    from .nf4_gemv_cuda import nf4_gemv_cuda

    lb = [b.contiguous() if b is not None else None for b in lora_b]

    def fused(cfg):
        if isinstance(cfg, (GemvConfig, DecodeMmaConfig)):  # each weight's LoRA term from its columns of xa
            xas = [None if (xa is None or b is None) else xa[:, c:c + b.shape[1]] for b, c in zip(lb, xa_cols)]
            if isinstance(cfg, DecodeMmaConfig):  # the weights in one launch where they can share it
                return nf4_decode_mma_many(x, weights, cfg, xas=xas, lora_bs=lb, scales=scales, biases=biases)
            gemv = nf4_gemv_cuda if cfg.cuda else nf4_gemv
            return [gemv(x, w, cfg, xa=xa_i, lora_b=b, scale=s, bias=bias)
                    for w, xa_i, b, s, bias in zip(weights, xas, lb, scales, biases)]
        return nf4_matmul_fwd(x, weights, cfg, xa=xa, lora_b=lb, scales=scales, xa_cols=xa_cols, biases=biases)

    def plain():
        return _plain_fwd(x, weights, xa, lora_b, scales, biases, xa_cols)

    rank = xa.shape[1] if xa is not None else 0
    K = int(weights[0].shape[1])
    cuda_ok = all(cuda_gemv_available(x, w) for w in weights)
    mma_ok = all(cuda_mma_available(x, w) for w in weights)
    choice = nf4_dispatch.choose("fwd", x, [out_features(w) for w in weights], K, rank, fused, plain,
                                 cuda_gemv=cuda_ok, cuda_mma=mma_ok)
    return plain() if choice == nf4_dispatch.CUBLAS else fused(choice)


def _plain_t(grads, weights, p, a_cat) -> torch.Tensor:
    dx = grads[0] @ dense(weights[0], grads[0].dtype)
    for g, w in zip(grads[1:], weights[1:]):
        dx.addmm_(g, dense(w, g.dtype))
    if p is not None and a_cat is not None:
        dx.addmm_(p, a_cat)
    return dx


def frozen_matmul_t(
    grads: list[torch.Tensor],
    weights: list,
    *,
    p: torch.Tensor | None = None,
    a_cat: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σᵢ gradsᵢ·Wᵢ + p·a_cat`` [M, K]; grads [M, N_i] with unit last stride, p/a_cat in their dtype."""
    if not _fusable(weights, grads[0]):
        return _plain_t(grads, weights, p, a_cat)
    from ..triton_kernels.nf4_matmul_t import nf4_matmul_t

    a_c = a_cat.contiguous() if a_cat is not None else None

    def fused(cfg):
        return nf4_matmul_t(grads, weights, cfg, p=p, a_cat=a_c)

    def plain():
        return _plain_t(grads, weights, p, a_cat)

    rank = p.shape[1] if p is not None else 0
    K = int(weights[0].shape[1])
    choice = nf4_dispatch.choose("t", grads[0], [out_features(w) for w in weights], K, rank, fused, plain)
    return plain() if choice == nf4_dispatch.CUBLAS else fused(choice)
