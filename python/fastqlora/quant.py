"""NF4 weights in bitsandbytes' exact layout: quantize, dequantize, checkpoint tensors.

Layout: the weight is flattened; element ``i`` takes a 4-bit code into the 16-value NF4
table, stored in byte ``i // 2`` (even ``i`` in the high nibble); each block of
``blocksize`` (64) elements has one fp32 absmax and a value is ``code[q]·absmax``.
With double quantization the absmax values, minus their mean (the offset), are
quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map.

The work runs in the compiled extension (CPU, or CUDA on the current stream); this
module owns shapes, dtypes and validation. The pure-torch
:func:`dequantize_nf4_reference` is the oracle the tests use.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._ext import ext, ptr, require_cuda, stream_of

NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCKSIZES = (32, 64, 128, 256, 512)
NESTED_BLOCKSIZE = 256
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (sorted, 256 values in [-1, 1]): a decimal
    exponent plus a linear fraction whose bits shrink as the exponent grows."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if extra > 0:
        bounds = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"{what} has dtype {x.dtype}; NF4 takes float32, float16 or bfloat16")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty: nothing to quantize")


def _run(t: torch.Tensor, cpu_name: str, cuda_name: str, *args) -> None:
    """Call the CPU or CUDA flavour of an extension function for tensors on t's device."""
    if t.is_cuda:
        require_cuda(cuda_name)
        # the usual case, t on the current device, pays for no device switch
        same = t.device.index == torch.cuda.current_device()
        with contextlib.nullcontext() if same else torch.cuda.device(t.device):
            getattr(ext(), cuda_name)(*args, stream_of(t))
    elif t.device.type == "cpu":
        getattr(ext(), cpu_name)(*args)
    else:
        raise ValueError(f"NF4 runs on CPU or CUDA tensors, not {t.device.type}")


def quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ``[ceil(n/2)]``, fp32 absmax ``[ceil(n/blocksize)]``) of ``x``."""
    _check_float(x, "the tensor to quantize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported; choose one of {BLOCKSIZES}")
    x = x.contiguous()
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32, device=x.device)
    _run(x, "nf4_quantize_cpu", "nf4_quantize_cuda", ptr(x), n, _DTYPE_CODES[x.dtype], blocksize, ptr(packed),
         ptr(absmax))
    return packed, absmax


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization of fp32 ``x`` with a sorted 256-entry ``code``."""
    if x.dtype != torch.float32:
        raise TypeError(f"8-bit blockwise quantization takes float32, got {x.dtype}")
    x = x.contiguous()
    code = code.to(device=x.device, dtype=torch.float32).contiguous()
    n = x.numel()
    out = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32, device=x.device)
    _run(x, "quantize_blockwise8_cpu", "quantize_blockwise8_cuda", ptr(x), n, ptr(code), blocksize, ptr(out),
         ptr(absmax))
    return out, absmax


@dataclass
class NF4Tensor:
    """A quantized weight: packed codes, block scales and the original shape and dtype."""

    packed: torch.Tensor
    absmax: torch.Tensor  # fp32 (plain) or uint8 (nested)
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = NF4_CODE.to(self.packed.device)
        n = self.numel
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed codes for shape {tuple(self.shape)} must be {(n + 1) // 2} uint8 values, "
                             f"got {self.packed.numel()} of {self.packed.dtype}")
        blocks = (n + self.blocksize - 1) // self.blocksize
        if self.absmax.numel() != blocks:
            raise ValueError(f"absmax must have {blocks} values for {n} elements in blocks of {self.blocksize}, "
                             f"got {self.absmax.numel()}")
        if self.nested:
            if self.absmax.dtype != torch.uint8 or self.nested_code is None or self.nested_offset is None:
                raise ValueError("a double-quantized NF4 weight needs uint8 absmax, nested_code and nested_offset")
            need = (blocks + self.nested_blocksize - 1) // self.nested_blocksize
            if self.nested_absmax.numel() != need:
                raise ValueError(f"nested_absmax must have {need} values, got {self.nested_absmax.numel()}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {self.absmax.dtype}")

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def quantize(cls, w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True) -> NF4Tensor:
        """Quantize ``w`` on its own device, as ``bitsandbytes.functional.quantize_4bit``
        with ``quant_type="nf4"`` does."""
        packed, absmax = quantize_nf4(w, blocksize)
        if not compress_statistics:
            return cls(packed, absmax, w.shape, w.dtype, blocksize)
        offset = absmax.mean()  # torch's reduction, as bitsandbytes computes it
        code2 = dynamic_map().to(w.device)
        qabs, absmax2 = quantize_blockwise8(absmax - offset, code2, NESTED_BLOCKSIZE)
        return cls(packed, qabs, w.shape, w.dtype, blocksize, nested_absmax=absmax2, nested_code=code2,
                   nested_offset=float(offset))

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the dtype it came from), shape ``self.shape``."""
        dtype = dtype or self.dtype
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"NF4 dequantizes to float32, float16 or bfloat16, not {dtype}")
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif out.dtype != dtype or out.numel() != self.numel or not out.is_contiguous() or out.device != self.device:
            raise ValueError(f"out must be a contiguous {dtype} tensor of {self.numel} elements on {self.device}")
        nested = self.nested
        _run(self.packed, "nf4_dequantize_cpu", "nf4_dequantize_cuda", ptr(self.packed),
             0 if nested else ptr(self.absmax), ptr(self.absmax) if nested else 0,
             ptr(self.nested_code) if nested else 0, ptr(self.nested_absmax) if nested else 0,
             float(self.nested_offset or 0.0), self.nested_blocksize, self.numel, self.blocksize, ptr(out),
             _DTYPE_CODES[dtype])
        return out.view(self.shape)

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Tensor.from_tensors(moved, self.shape, self.dtype, self.blocksize, self.nested_offset,
                                      self.nested_blocksize)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.nested:
            out.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], shape, dtype: torch.dtype, blocksize: int = 64,
                     nested_offset: float | None = None, nested_blocksize: int = NESTED_BLOCKSIZE) -> NF4Tensor:
        return cls(tensors["packed"], tensors["absmax"], torch.Size(shape), dtype, blocksize, tensors.get("code"),
                   tensors.get("nested_absmax"), tensors.get("nested_code"), nested_offset, nested_blocksize)

    # -- transformers' pre-quantized checkpoint format ----------------------------------
    def to_checkpoint(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors as transformers writes a bnb-4bit layer ``prefix`` (e.g.
        ``model.layers.0.mlp.up_proj``)."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}
        # the code tables are clones: every layer shares one table in memory, and safetensors
        # refuses tensors that share storage
        out = {f"{prefix}.weight": self.packed.reshape(-1, 1), f"{prefix}.weight.absmax": self.absmax,
               f"{prefix}.weight.quant_map": self.code.clone()}
        if self.nested:
            out[f"{prefix}.weight.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.weight.nested_quant_map"] = self.nested_code.clone()
            state.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                         nested_offset=self.nested_offset)
        out[f"{prefix}.weight.{QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        return out

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], prefix: str, source: str = "") -> NF4Tensor:
        """Rebuild from the tensors of a pre-quantized checkpoint (no re-quantization)."""
        where = f" in {source}" if source else ""
        key = f"{prefix}.weight.{QUANT_STATE_KEY}"
        if key not in tensors:
            raise ValueError(f"tensor {key} is missing{where}: not a bitsandbytes NF4 layer")
        try:
            state = json.loads(bytes(tensors[key].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"tensor {key}{where} does not hold a readable quant state (truncated?)") from None
        for field_name in ("quant_type", "blocksize", "dtype", "shape"):
            if field_name not in state:
                raise ValueError(f"quant state {key}{where} lacks '{field_name}' (truncated?)")
        if state["quant_type"] != "nf4":
            raise ValueError(f"{prefix}{where} is quantized as {state['quant_type']!r}; only NF4 is supported")
        if state["dtype"] not in _DTYPE_NAMES:
            raise ValueError(f"quant state {key}{where} has dtype {state['dtype']!r}")

        def need(suffix: str) -> torch.Tensor:
            name = f"{prefix}.weight{suffix}"
            if name not in tensors:
                raise ValueError(f"tensor {name} is missing{where}")
            return tensors[name]

        nested = "nested_offset" in state
        return cls(
            packed=need("").reshape(-1).to(torch.uint8),
            absmax=need(".absmax"),
            shape=torch.Size(state["shape"]),
            dtype=_DTYPE_NAMES[state["dtype"]],
            blocksize=int(state["blocksize"]),
            code=need(".quant_map").float(),
            nested_absmax=need(".nested_absmax").float() if nested else None,
            nested_code=need(".nested_quant_map").float() if nested else None,
            nested_offset=float(state["nested_offset"]) if nested else None,
            nested_blocksize=int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dequantize_nf4_reference(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure torch, any device: the oracle for the extension and the fused kernels."""
    n = t.numel
    codes = torch.stack([t.packed >> 4, t.packed & 0xF], dim=1).reshape(-1)[:n].long()
    if t.nested:
        blocks = torch.arange(t.absmax.numel(), device=t.device) // t.nested_blocksize
        absmax = t.nested_code[t.absmax.long()] * t.nested_absmax[blocks]
        absmax = absmax + t.nested_offset
    else:
        absmax = t.absmax
    values = t.code.to(t.device)[codes] * absmax[torch.arange(n, device=t.device) // t.blocksize]
    return values.to(dtype or t.dtype).reshape(t.shape)
