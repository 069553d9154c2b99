"""Checkpoints in, models out: config.json plus safetensors (single or sharded),
read through memory maps one tensor at a time.

With ``load_in_4bit`` each projection is moved to the target device, quantized there
to NF4 and its 16-bit copy dropped before the next is read, so peak memory stays
near the final model plus one weight. Pre-quantized bnb-4bit checkpoints load
without re-quantizing. The model is built on the meta device first, so nothing is
allocated twice. Every error names the file and the key.

An image-text checkpoint (Gemma 3) loads as its text model: its language-model tensors are
renamed to the text model's keys (``text_key``) and the rest (vision tower, projector) is left
on disk, listed in ``model.passthrough`` for the merged export to copy.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from .models.causal_lm import CausalLM
from .models.config import ModelConfig
from .models.families import read_config
from .models.linear import FrozenLinear
from .quant import QUANT_STATE_KEY, NF4Tensor

_NF4_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + QUANT_STATE_KEY)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# an image-text checkpoint's names for its text model's tensors -> ours (transformers 4's hub
# layout first, then transformers 5's module paths)
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def text_key(cfg: ModelConfig, key: str) -> str | None:
    """Our key for checkpoint tensor ``key``; None for a tensor outside the text model (the
    vision tower of an image-text checkpoint)."""
    if cfg.wrapper is None:
        return key
    for prefix, ours in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_path(name_or_path: str | Path, token: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched through huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model folder {name} does not exist (and it is not a hub id like 'org/model')")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, token=token, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"])
    except Exception as exc:  # offline, unknown id, gated repo...
        raise FileNotFoundError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "download it where there is network and pass the local folder instead") from None
    return Path(local)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index ({exc})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is listed in {index} but does not exist")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"{path} holds only PyTorch .bin weights; fastqlora reads safetensors "
                         "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"no *.safetensors weights in {path}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, object, list[str]]]:
    """(file, open handle, keys) for each weight file, with readable errors."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                yield f, handle, list(handle.keys())
        except Exception as exc:
            if isinstance(exc, (ValueError, FileNotFoundError)) and str(f) in str(exc):
                raise
            raise ValueError(f"{f} is not a readable safetensors file (truncated or another format?): {exc}") from None


def _get(handle, f: Path, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as exc:
        raise ValueError(f"tensor {key} in {f} could not be read (truncated file?): {exc}") from None


def load_model(path: str | Path, dtype: torch.dtype | None = None, load_in_4bit: bool = True,
               device: torch.device | str | None = None, model_cls: type[CausalLM] = CausalLM,
               cfg: ModelConfig | None = None) -> CausalLM:
    path = Path(path)
    cfg = cfg or read_config(path)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or default_dtype(device)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    with torch.device("meta"):
        model = model_cls(cfg, dtype=dtype)
    expected = _expected_keys(model)
    seen: set[str] = set()
    passthrough: list[tuple[Path, str, bool]] = []  # (file, key, pre-quantized) outside the text model
    for f, handle, keys in iter_tensors(weight_files(path)):
        keyset = set(keys)
        for key in keys:
            if key.endswith(_NF4_SUFFIXES) or key.endswith(_IGNORED_SUFFIXES):
                continue
            name = text_key(cfg, key)
            if name is None:
                passthrough.append((f, key, f"{key}.{QUANT_STATE_KEY}" in keyset))
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if name not in expected:
                raise ValueError(f"unexpected tensor {key} in {f}: it matches no parameter of a "
                                 f"{cfg.model_type} model with this config")
            module, attr = expected[name]
            if isinstance(module, FrozenLinear) and f"{key}.{QUANT_STATE_KEY}" in keyset:
                q = NF4Tensor.from_checkpoint({k: _get(handle, f, k) for k in keys if k.startswith(key)},
                                              key[: -len(".weight")], str(f))
                _check_shape(q.shape, module, attr, key, f)
                q = q.to(device)
                module.set_nf4(q) if load_in_4bit else module.set_weight(q.dequantize(dtype))
            else:
                t = _get(handle, f, key)
                _check_shape(t.shape, module, attr, key, f)
                t = t.to(device=device, dtype=dtype)
                if isinstance(module, FrozenLinear) and attr == "weight":
                    # the lm_head stays 16-bit, as transformers + bitsandbytes keep it
                    quantize = load_in_4bit and name != "lm_head.weight"
                    module.set_nf4(NF4Tensor.quantize(t)) if quantize else module.set_weight(t)
                else:
                    setattr(module, attr, nn.Parameter(t, requires_grad=False))
                del t
            seen.add(name)
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint in {path} "
                         f"({len(missing)} missing in all)")
    model.passthrough = passthrough
    return model


def _expected_keys(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    keys: dict[str, tuple[nn.Module, str]] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            keys[f"{mname}.{pname}" if mname else pname] = (module, pname)
    return keys


def _check_shape(shape, module: nn.Module, attr: str, key: str, f: Path) -> None:
    if isinstance(module, FrozenLinear) and attr == "weight":
        want = (module.out_features, module.in_features)
    else:
        want = tuple(getattr(module, attr).shape)
    if tuple(shape) != want:
        raise ValueError(f"tensor {key} in {f} has shape {tuple(shape)}, expected {want}")
