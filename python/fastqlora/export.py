"""Writing models out: PEFT adapters, and merged 16-bit Hugging Face checkpoints.

The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key
names) loads in peft, vLLM and llama.cpp's converters. The merged folder holds
``W + s·B·A`` for every adapted projection (dequantized from NF4 first), sharded
safetensors with an index, config.json without the quantization settings, and the
tokenizer: transformers loads it as a plain model. ``nf4=True`` quantizes the merged
projections again and writes them in transformers' bnb-4bit format, with its
quantization_config, for transformers + bitsandbytes (and this library) to load as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .lora import LoraAdapter, LoraEmbeddingAdapter, adapter_state_dict, iter_adapters, peft_key
from .models.linear import FrozenLinear
from .quant import NF4Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def trainable_module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole modules trained in place (``modules_to_save``), under PEFT's key names."""
    out = {}
    for name in getattr(model, "modules_to_save", None) or []:
        path = "lm_head" if name == "lm_head" else f"model.{name}"
        out[f"{peft_key(model, path)}.weight"] = model.get_submodule(path).weight.detach()
    return out


def save_adapter(model: nn.Module, directory: str | Path, peft_config: dict) -> Path:
    directory = Path(directory)
    tensors = {**adapter_state_dict(model), **trainable_module_tensors(model)}
    if not tensors:
        raise ValueError("the model has no adapters to save: call FastLanguageModel.get_peft_model first, "
                         "or save the whole model with save_pretrained_merged")
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    if getattr(getattr(model, "cfg", None), "wrapper", None):
        # names alone would make PEFT adapt the vision tower's q/k/v too: a regex (PEFT matches a
        # string in full) keeps the adapters to the language model, under either transformers
        # version's module paths
        names = "|".join(peft_config["target_modules"])
        peft_config = {**peft_config, "target_modules": rf".*language_model.*\.({names})"}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return directory


def merged_tensors(model: nn.Module, dtype: torch.dtype, nf4: bool = False):
    """(Hugging Face key, tensor on CPU) for every weight, adapters merged in fp32. With
    ``nf4`` the merged projections (not the lm_head) are quantized again, to NF4 with double
    quantization, and written as transformers writes a bnb-4bit layer."""
    delta_of = {name: adapter for name, _, adapter in iter_adapters(model)}
    done: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, FrozenLinear):
            w = module.dense_weight(torch.float32)
            if name in delta_of and isinstance(delta_of[name], LoraAdapter):
                w = w + delta_of[name].delta_weight().to(w.device)
            if nf4 and name != "lm_head":
                # quantized from the weight rounded to dtype, as loading a 16-bit merge would
                q = NF4Tensor.quantize(w.to(dtype), compress_statistics=True)
                yield from ((k, t.cpu()) for k, t in q.to_checkpoint(name).items())
            else:
                yield f"{name}.weight", w.to(dtype).cpu()
            done.add(f"{name}.weight")
            if module.bias is not None:
                yield f"{name}.bias", module.bias.detach().to(dtype).cpu()
                done.add(f"{name}.bias")
        elif name in delta_of and isinstance(delta_of[name], LoraEmbeddingAdapter):
            w = module.weight.detach().float() + delta_of[name].delta_weight().to(module.weight.device)
            yield f"{name}.weight", w.to(dtype).cpu()
            done.add(f"{name}.weight")
    for key, p in model.named_parameters():
        if key not in done and ".adapter." not in key:
            yield key, p.detach().to(dtype).cpu()


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype, nf4: bool = False):
    """:func:`merged_tensors` under the names of the checkpoint the model came from: for an
    image-text checkpoint (Gemma 3) the text model's tensors under ``language_model.``, then the
    tensors it did not load (vision tower, projector) copied from its files."""
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "wrapper", None):
        yield from merged_tensors(model, dtype, nf4)
        return
    for key, t in merged_tensors(model, dtype, nf4):
        yield "language_model." + key, t
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for f, key, _ in model.passthrough:
        by_file.setdefault(Path(f), []).append(key)
    for f, keys in by_file.items():
        if not f.is_file():
            raise FileNotFoundError(f"{f} (the checkpoint this model was loaded from) is gone: its "
                                    f"{len(keys)} vision tensors cannot be copied into the merged checkpoint")
        with safe_open(str(f), framework="pt") as handle:
            for key in keys:
                t = handle.get_tensor(key)
                yield key, (t.to(dtype) if t.is_floating_point() else t)


def bnb_4bit_config(dtype: torch.dtype, skip: list[str]) -> dict:
    """config.json's quantization_config for an NF4 (double-quantized) checkpoint, as
    transformers + bitsandbytes write it."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def save_merged(model: nn.Module, directory: str | Path, config: dict, tokenizer=None,
                dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30, nf4: bool = False) -> Path:
    directory = Path(directory)
    quantized = [key for _, key, q in getattr(model, "passthrough", []) if q]
    if quantized:
        raise ValueError(f"tensor {quantized[0]} outside the text model is stored in 4 bits in the checkpoint this "
                         f"model was loaded from, so a 16-bit merged checkpoint cannot include it; merge onto the "
                         f"16-bit original checkpoint instead (load it, load the adapter, save_pretrained_merged)")
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in checkpoint_tensors(model, dtype, nf4):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if nf4:
        skip = ["lm_head"] + (["vision_tower", "multi_modal_projector"] if getattr(model.cfg, "wrapper", None) else [])
        cfg["quantization_config"] = bnb_4bit_config(dtype, skip)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
