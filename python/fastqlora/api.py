"""``FastLanguageModel``: the facade users call, shaped like Unsloth's so that code
written for it runs after changing the import alone.

    model, tokenizer = FastLanguageModel.from_pretrained(path_or_hub_id, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, ...)
    ... train with transformers.Trainer, trl.SFTTrainer, or fastqlora's own loop ...
    model.save_pretrained("adapter/")
    model.save_pretrained_merged("merged/", tokenizer)
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpointing import resolve_mode
from .export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter, save_merged
from .loading import load_model, resolve_model_path
from .lora import (FUSED_TARGETS, LINEAR_TARGETS, OTHER_TARGETS, attach_lora, iter_adapters, load_adapter_state_dict,
                   module_name_from_peft, targets_for, validate_targets)
from .models.causal_lm import CausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class FastModel(CausalLM):
    """The model users hold: a CausalLM that also saves adapters and merged weights."""

    name_or_path: str = ""
    max_seq_length: int = 2048
    peft_config: dict[str, Any] | None = None
    modules_to_save: list[str] | None = None

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        if self.peft_config is None:
            raise ValueError("this model has no LoRA adapters: call FastLanguageModel.get_peft_model first, "
                             "or use save_pretrained_merged to write the whole model")
        save_adapter(self, save_directory, self.peft_config)

    def save_pretrained_merged(self, save_directory: str | Path, tokenizer=None, save_method: str = "merged_16bit",
                               dtype: torch.dtype | None = None, max_shard_size: int = 5 * 2**30, **kwargs) -> None:
        """Write a Hugging Face checkpoint with ``W + s·B·A`` merged (NF4 dequantized first):
        16-bit (``save_method="merged_16bit"``), or quantized again to NF4 in transformers'
        bnb-4bit format (``"merged_4bit"``; ``"merged_4bit_forced"`` is the same)."""
        methods = ("merged_16bit", "merged_4bit", "merged_4bit_forced")
        if save_method not in methods:
            raise ValueError(f"save_method {save_method!r} is not supported; use one of {methods}")
        dtype = dtype or (self.dtype if self.dtype != torch.float32 else torch.float32)
        save_merged(self, save_directory, self.cfg.wrapper_raw or self.cfg.raw, tokenizer, dtype, max_shard_size,
                    nf4=save_method != "merged_16bit")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model is its base (PEFT's ``disable_adapter``): the adapters are
        detached from their modules and put back after, trained values untouched."""
        attached = [(module, module.adapter) for _, module, _ in iter_adapters(self)]
        try:
            for module, _ in attached:
                module.adapter = None
            yield self
        finally:
            for module, adapter in attached:
                module.adapter = adapter

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters()) + sum(b.numel() * 2 for n, b in self.named_buffers()
                                                                if n.endswith("nf4_packed"))
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def _generation_eos(path: Path) -> list[int]:
    """The stop tokens of the folder's generation_config.json (instruct models list their
    end-of-turn token there: Gemma's <end_of_turn>, Llama 3's <|eot_id|>); [] without one."""
    f = path / "generation_config.json"
    if not f.is_file():
        return []
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        warnings.warn(f"{f} is not a JSON object: its stop tokens are ignored", stacklevel=3)
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        warnings.warn(f"{path} has no tokenizer files: returning tokenizer=None", stacklevel=3)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_adapter_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load ``adapter_model.safetensors`` from ``directory`` into the attached adapters."""
    from safetensors.torch import load_file

    f = Path(directory) / ADAPTER_WEIGHTS
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist: not an adapter folder")
    tensors = load_file(str(f))
    load_adapter_state_dict(model, tensors, str(f))
    extra = {k: v for k, v in tensors.items() if ".lora_" not in k}
    with torch.no_grad():
        for key, value in extra.items():
            name = module_name_from_peft(model, key).removesuffix(".weight")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"tensor {key} in {f} matches no module of the model") from None
            if tuple(module.weight.shape) != tuple(value.shape):
                raise ValueError(f"tensor {key} in {f} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(module.weight.shape)}")
            module.weight.copy_(value.to(module.weight.dtype))


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str | Path, max_seq_length: int = 2048, dtype: torch.dtype | str | None = None,
                        load_in_4bit: bool = True, device: str | torch.device | None = None,
                        token: str | None = None, **kwargs) -> tuple[FastModel, Any]:
        """Load a model folder or hub id (or an adapter folder: its base is loaded and the
        adapter attached). Returns ``(model, tokenizer)``; tokenizer is None when the
        folder has none."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}; use 'bfloat16', 'float16' or 'float32'")
        unknown = sorted(set(kwargs) - {"device_map", "attn_implementation", "trust_remote_code", "fix_tokenizer"})
        if unknown:
            warnings.warn(f"from_pretrained ignores {unknown}", stacklevel=2)
        path = resolve_model_path(model_name, token)
        adapter_cfg = path / ADAPTER_CONFIG
        if adapter_cfg.is_file():
            return _from_adapter(path, max_seq_length, dtype, load_in_4bit, device, token)
        model = load_model(path, dtype, load_in_4bit, device, model_cls=FastModel)
        model.name_or_path = str(model_name)
        model.max_seq_length = max_seq_length
        model.generation_eos = _generation_eos(path)
        return model, _tokenizer(path)

    @staticmethod
    def get_peft_model(model: FastModel, r: int = 16, target_modules: list[str] | str | None = None,
                       lora_alpha: float = 16, lora_dropout: float = 0.0, bias: str = "none",
                       use_gradient_checkpointing: bool | str = True, random_state: int = 3407,
                       use_rslora: bool = False, modules_to_save: list[str] | None = None,
                       **kwargs) -> FastModel:
        """Freeze the base, attach LoRA to ``target_modules`` (initialized as PEFT does),
        and choose gradient checkpointing (True, False, "offload" or "unsloth")."""
        if not isinstance(model, CausalLM):
            raise TypeError(f"get_peft_model takes a model from FastLanguageModel.from_pretrained, "
                            f"got {type(model).__name__}")
        if bias != "none":
            raise ValueError(f"bias={bias!r} is not supported; use bias='none'")
        if getattr(model, "peft_config", None) is not None:
            raise ValueError("this model already has LoRA adapters")
        mode = resolve_mode(use_gradient_checkpointing)
        targets = targets_for(model, validate_targets(target_modules if target_modules is not None
                                                      else list(LINEAR_TARGETS)))
        for p in model.parameters():
            p.requires_grad_(False)
        attach_lora(model, targets, r, lora_alpha, lora_dropout, use_rslora, seed=random_state)
        saved = list(modules_to_save or [])
        for name in saved:
            if name not in ("lm_head", "embed_tokens"):
                raise ValueError(f"modules_to_save supports 'lm_head' and 'embed_tokens', not {name!r}")
            if name == "lm_head" and model.lm_head is None:
                raise ValueError("modules_to_save=['lm_head'] on a model with tied embeddings: "
                                 "train 'embed_tokens' instead")
            module = model.lm_head if name == "lm_head" else model.model.embed_tokens
            if name == "lm_head" and module.is_quantized:
                raise ValueError("lm_head is quantized and cannot be trained")
            module.weight.requires_grad_(True)
        model.modules_to_save = saved or None
        model.gradient_checkpointing = mode
        model.peft_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "target_modules": targets, "bias": "none", "use_rslora": use_rslora,
            "modules_to_save": saved or None, "base_model_name_or_path": model.name_or_path or None,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
            "revision": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {},
        }
        model.train()
        return model

    @staticmethod
    def for_inference(model: FastModel) -> FastModel:
        """Evaluation mode: no dropout, no checkpointing; ``model.generate`` uses a KV cache."""
        model.eval()
        return model

    @staticmethod
    def for_training(model: FastModel, cuda_graph: bool | None = None, **graph_options) -> FastModel:
        """Training mode. ``cuda_graph=True``: on a GPU, replay each training step's model
        work from CUDA graphs, one set per batch shape: a forward that computes the loss
        (labels given, no logits asked for) runs with its backward from one graph
        (``train.graphed_loss``: transformers' Trainer, plain loops); ``model.base_model(...)``,
        which trl's SFTTrainer calls to compute its own loss from the hidden states, runs its
        forward and its backward from two (``train.graphed_backbone``). The optimizer and
        everything else the loop does stays eager. ``False`` turns that off; None leaves it as
        it was. ``graph_options``: ``bucket`` (widths padded to a multiple, 128),
        ``max_graphs`` (shapes with graphs, 4; once taken, a batch at most a third narrower than
        one of them is padded up to it, a wider one runs eagerly), ``warmup`` (eager calls of a
        shape first, 2)."""
        model.train()
        if cuda_graph is not None:
            if cuda_graph:
                from .train.graphed_backbone import GraphedBackbone
                from .train.graphed_loss import GraphedLoss

                model._graphed_loss = GraphedLoss(model, **graph_options)
                model._graphed_backbone = GraphedBackbone(model, **graph_options)
            else:
                model._graphed_loss = model._graphed_backbone = None
        return model


def _from_adapter(path: Path, max_seq_length: int, dtype, load_in_4bit: bool, device, token):
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / ADAPTER_CONFIG} is not valid JSON: {exc.msg}") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path / ADAPTER_CONFIG}: only LoRA adapters are supported, not {cfg['peft_type']}")
    model, tokenizer = FastLanguageModel.from_pretrained(base, max_seq_length, dtype, load_in_4bit, device, token)
    targets = cfg.get("target_modules") or list(LINEAR_TARGETS)
    if isinstance(targets, str):
        allowed = LINEAR_TARGETS + FUSED_TARGETS + OTHER_TARGETS
        if targets in ("all-linear", "all"):
            targets = list(LINEAR_TARGETS)
        elif targets in allowed:
            targets = [targets]
        else:  # a PEFT regex (what image-text models' adapters use): the projections it names
            targets = [t for t in allowed if re.search(rf"(?<![A-Za-z0-9_]){t}(?![A-Za-z0-9_])", targets)]
            if not targets:
                raise ValueError(f"{path / ADAPTER_CONFIG}: target_modules {cfg['target_modules']!r} names none "
                                 f"of {list(allowed)}")
    model = FastLanguageModel.get_peft_model(
        model, r=cfg["r"], target_modules=list(targets), lora_alpha=cfg.get("lora_alpha", cfg["r"]),
        lora_dropout=cfg.get("lora_dropout", 0.0), use_rslora=cfg.get("use_rslora", False),
        modules_to_save=cfg.get("modules_to_save"), use_gradient_checkpointing=False)
    model.peft_config["base_model_name_or_path"] = base
    load_adapter_weights(model, path)
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = _tokenizer(path)
    return model, tokenizer

