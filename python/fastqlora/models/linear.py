"""``FrozenLinear``: a projection whose base weight never trains — 16-bit, or NF4 in
bitsandbytes' layout — with an optional adapter whose output is added (LoRA).

The NF4 fields live in buffers, so ``.to()``, ``.cuda()`` and ``state_dict`` carry
them; :meth:`nf4` rebuilds the :class:`~fastqlora.quant.NF4Tensor` view on demand.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.dispatch import fused_nf4_enabled, grouped_lora_enabled
from ..ops.dropout import lora_dropout
from ..ops.lora_decode import decode_route, in_decoding, lora_decode_group
from ..ops.lora_linear import compute_dtype, lora_linear, lora_linear_group
from ..quant import NF4Tensor

_NF4_PREFIX = "nf4_"


class FrozenLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self._nf4_meta: dict | None = None
        self._nf4_view: tuple | None = None  # (NF4Tensor, the buffers it was built from)
        self.adapter: nn.Module | None = None

    # -- base weight -----------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self._nf4_meta is not None

    def set_weight(self, w: torch.Tensor) -> None:
        """Install a 16-bit base weight ``[out, in]`` (frozen)."""
        self._check_shape(tuple(w.shape))
        self._drop_nf4()
        self.weight = nn.Parameter(w.detach(), requires_grad=False)

    def set_nf4(self, q: NF4Tensor) -> None:
        """Install an NF4 base weight (frozen); the 16-bit one is dropped."""
        self._check_shape(tuple(q.shape))
        self._drop_nf4()
        self.weight = None
        for name, t in q.tensors().items():
            self.register_buffer(_NF4_PREFIX + name, t)
        self._nf4_meta = {"shape": tuple(q.shape), "dtype": q.dtype, "blocksize": q.blocksize,
                          "nested_offset": q.nested_offset, "nested_blocksize": q.nested_blocksize}

    def nf4(self) -> NF4Tensor:
        """The NF4 weight over this module's buffers. Built once and reused while the
        buffers are the same tensors (``.to()``, ``load_state_dict(assign=True)`` or
        ``set_nf4`` replace them, and the view is rebuilt): it is asked for at every call."""
        if self._nf4_meta is None:
            raise ValueError("this projection's weight is not quantized")
        bufs = tuple((name, buf) for name, buf in self._buffers.items() if name.startswith(_NF4_PREFIX))
        hit = self._nf4_view
        if hit is not None and len(hit[1]) == len(bufs) and all(
                n == m and t is u for (n, t), (m, u) in zip(hit[1], bufs)):
            return hit[0]
        tensors = {name[len(_NF4_PREFIX):]: buf for name, buf in bufs}
        meta = self._nf4_meta
        q = NF4Tensor.from_tensors(tensors, meta["shape"], meta["dtype"], meta["blocksize"],
                                   meta["nested_offset"], meta["nested_blocksize"])
        self._nf4_view = (q, bufs)
        return q

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight ``[out, in]`` in ``dtype`` (dequantized when NF4)."""
        if self._nf4_meta is not None:
            return self.nf4().dequantize(dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {shape} does not fit a projection "
                             f"[{self.out_features}, {self.in_features}]")

    def _drop_nf4(self) -> None:
        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith(_NF4_PREFIX)]:
            delattr(self, name)
        self._nf4_meta = None
        self._nf4_view = None

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() replace the buffers: drop the view so it does not keep the
        # old tensors (another device's memory) alive until the next call
        self._nf4_view = None
        return super()._apply(fn, recurse)

    # -- forward -----------------------------------------------------------------------
    def proj(self):
        """This projection as the fused ops' ``LoraProj`` (dropout only in training)."""
        from ..ops.lora_fused import LoraProj

        a = self.adapter
        base = self.nf4() if self._nf4_meta is not None else self.weight
        if a is None:
            return LoraProj(base, self.bias)
        return LoraProj(base, self.bias, a.lora_A, a.lora_B, a.scale, a.dropout_p if self.training else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_nf4_enabled(x) and (self.adapter is None or hasattr(self.adapter, "lora_A")):
            from ..ops.lora_fused import lora_projections

            return lora_projections(x, [self.proj()])[0]
        base = self.nf4() if self._nf4_meta is not None else self.weight
        a = self.adapter
        if a is None:
            return lora_linear(x, base, self.bias)
        if not hasattr(a, "lora_A"):  # any other adapter module: added on top
            return lora_linear(x, base, self.bias) + a(x)
        x_lora = lora_dropout(x, a.dropout_p, self.training) if a.dropout_p > 0 else None
        cast = a.cast_weights(compute_dtype(x)) if hasattr(a, "cast_weights") else None
        return lora_linear(x, base, self.bias, a.lora_A, a.lora_B, a.scale, x_lora, cast=cast)

    def extra_repr(self) -> str:
        kind = "nf4" if self.is_quantized else str(self.weight.dtype).replace("torch.", "")
        return f"in={self.in_features}, out={self.out_features}, base={kind}, bias={self.bias is not None}"


def _hooked(m: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    return bool(m._forward_hooks or m._forward_pre_hooks or _m._global_forward_hooks
                or _m._global_forward_pre_hooks)


def group_adapters(projs: list[FrozenLinear]) -> list | None:
    """The LoRA adapters of projections that read the same input, when they can run as one
    grouped op (each has a plain LoRA adapter, one scale, one input width); else None."""
    ads = [p.adapter for p in projs]
    if len(projs) < 2 or any(a is None or not hasattr(a, "cast_weights") for a in ads):
        return None
    if len({a.scale for a in ads}) != 1 or len({p.in_features for p in projs}) != 1:
        return None
    return ads


def grouped_forward(projs: list[FrozenLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """``[p(x) for p in projs]`` for projections that read the same x (q, k, v; gate, up).
    With ``FASTQLORA_GROUPED_LORA=1``, LoRA on each and no dropout in use: one grouped op
    (ops.lora_linear_group), the adapters' thin products stacked, ~7 fewer launches a group
    and step than one op each. Otherwise each projection on its own (so do hooked modules,
    whose hooks the group would skip, and generation: without gradients a few rows go to the
    NF4 decode kernels; where they take the group, its thin products are one, below)."""
    if in_decoding():
        return _decode_group(projs, x)
    ads = group_adapters(projs) if grouped_lora_enabled() else None
    if (ads is None or (any(a.dropout_p > 0 for a in ads) and any(p.training for p in projs))
            or any(_hooked(p) for p in projs)):
        return [p(x) for p in projs]
    from ..lora import cast_group

    a_cat, bs = cast_group(ads, compute_dtype(x))
    weights = [p.nf4() if p.is_quantized else p.weight for p in projs]
    return list(lora_linear_group(x, weights, [p.bias for p in projs], [a.lora_A for a in ads],
                                  [a.lora_B for a in ads], ads[0].scale, a_cat, bs))


def _decode_group(projs: list[FrozenLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """A generation step's grouped projections: through the NF4 decode dispatch with one
    thin LoRA product for the group (ops.lora_decode_group) when every projection is NF4
    with a plain LoRA adapter (no dropout in use, no hooks) and the step takes the decode
    kernels; else each projection on its own."""
    ads = group_adapters(projs)
    if (ads is None or any(p.training and a.dropout_p > 0 for p, a in zip(projs, ads)) or any(_hooked(p) for p in projs)
            or not all(p.is_quantized for p in projs) or torch.is_autocast_enabled(x.device.type)):
        return [p(x) for p in projs]
    weights = [p.nf4() for p in projs]
    if not decode_route(x, weights):
        return [p(x) for p in projs]
    from ..lora import cast_group

    a_cat, bs = cast_group(ads, compute_dtype(x))
    return lora_decode_group(x, weights, [p.bias for p in projs], a_cat, bs, ads[0].scale)
