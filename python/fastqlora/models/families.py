"""Reading ``config.json``: which families exist (``FAMILIES``: the switches each one's
transformers modeling code fixes), and how each spells the rest (rope parameters, which
layers slide, Gemma 3's per-layer-type RoPE, SmolLM3's layers without RoPE, image-text
checkpoints' ``text_config``), into one ``ModelConfig``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import ModelConfig

# model_type -> the family switches that config.json does not spell out. The biases:
# None reads config.json's ``attention_bias`` (transformers' own rule for that family),
# a bool is what the family's modeling code fixes whatever the config says.
_BASE = {"norm_offset": 0.0, "act": "silu", "scale_embeddings": False, "qkv_bias": None, "o_bias": None,
         "qk_norm": False, "sandwich_norms": False, "fused_projections": False, "post_norms": False}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_BASE),
    "mistral": {**_BASE, "qkv_bias": False, "o_bias": False},
    "gemma": {**_BASE, "norm_offset": 1.0, "act": "gelu_tanh", "scale_embeddings": True},
    "gemma2": {**_BASE, "norm_offset": 1.0, "act": "gelu_tanh", "scale_embeddings": True, "sandwich_norms": True},
    "qwen2": {**_BASE, "qkv_bias": True, "o_bias": False},
    "qwen3": {**_BASE, "qk_norm": True},
    "gemma3_text": {**_BASE, "norm_offset": 1.0, "act": "gelu_tanh", "scale_embeddings": True,
                    "sandwich_norms": True, "qk_norm": True},
    "phi3": {**_BASE, "qkv_bias": False, "o_bias": False, "fused_projections": True},
    "granite": dict(_BASE),
    "smollm3": dict(_BASE),
    "olmo2": {**_BASE, "qkv_bias": False, "o_bias": False, "post_norms": True},
}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
# image-text model_type -> the model_type of its text_config (the model trained here)
WRAPPERS: dict[str, str] = {"gemma3": "gemma3_text", "mistral3": "mistral"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
LAYER_TYPES = ("full_attention", "sliding_attention")


def _gemma3_ropes(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gemma 3's (full-attention rope, sliding rope): transformers 5 keeps one dict per layer
    type in ``rope_parameters``; older configs give ``rope_theta`` (+ ``rope_scaling``) for the
    full layers and ``rope_local_base_freq`` for the sliding ones."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 1_000_000.0)}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    full.setdefault("rope_theta", 1_000_000.0)
    local.setdefault("rope_theta", 10_000.0)
    for p in (full, local):
        if "type" in p and "rope_type" not in p:
            p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
    return full, local


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """One dict in transformers 5's ``rope_parameters`` form, from either config form."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if not params:
        params = dict(scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)))
    return params


def _layer_windows(cfg: dict[str, Any], model_type: str, layers: int, where: str) -> tuple[tuple, int | None]:
    """(each layer's sliding window or None, the window), by transformers' rules: config.json's
    ``layer_types`` when it has them; else Mistral slides every layer, Gemma 2 the even ones
    (0, 2, ...), Phi-3 every layer, Gemma 3 all but every ``sliding_window_pattern``-th, Qwen those from
    ``max_window_layers`` on when ``use_sliding_window``."""
    qwen = model_type in ("qwen2", "qwen3", "smollm3")  # windows only with use_sliding_window
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", not qwen) else None
    if model_type in ("llama", "gemma") or window is None:
        return (), None
    types = cfg.get("layer_types")
    if types is None:
        if model_type in ("mistral", "phi3"):
            types = ["sliding_attention"] * layers
        elif model_type == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        elif model_type == "gemma3_text":  # every sliding_window_pattern-th layer is full
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        elif model_type == "smollm3":  # the layers without RoPE slide
            types = ["full_attention" if r else "sliding_attention" for r in _smollm3_rope_layers(cfg, layers)]
        else:
            first = cfg.get("max_window_layers", layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    bad = [t for t in types if t not in LAYER_TYPES] if isinstance(types, list) else [types]
    if bad:
        raise ValueError(f"layer_types{where} must be a list of {' / '.join(LAYER_TYPES)}; got {bad[0]!r}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return (windows if any(w is not None for w in windows) else ()), window


def _text_model_config(cfg: dict[str, Any], model_type: str, source: str) -> ModelConfig:
    """The text model of an image-text checkpoint. Its ``text_config`` lists only what differs
    from transformers' defaults for the text type (Gemma 3 4B's omits the vocabulary and the head
    count), so transformers' config class fills in the rest."""
    import dataclasses

    from transformers import AutoConfig

    where = f" ({source})" if source else ""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"model_type {model_type!r}{where} needs a text_config object")
    text_type = WRAPPERS[model_type]
    if text.get("model_type", text_type) != text_type:
        raise ValueError(f"text_config.model_type {text.get('model_type')!r}{where} should be {text_type!r}")
    fields = {k: v for k, v in text.items() if k != "model_type"}
    # the outer model's flag decides (transformers ties by it: a tied checkpoint has no lm_head)
    if "tie_word_embeddings" in cfg:
        fields["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    try:
        full = AutoConfig.for_model(text_type, **fields).to_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"text_config{where} is not a valid {text_type} config: {exc}") from None
    full["model_type"] = text_type
    inner = config_from_dict(full, f"{source} text_config" if source else "text_config")
    return dataclasses.replace(inner, source=source, wrapper=model_type, wrapper_raw=dict(cfg))


def _smollm3_rope_layers(cfg: dict[str, Any], layers: int) -> tuple[bool, ...]:
    """SmolLM3's ``no_rope_layers`` (despite the name, 1 = the layer applies RoPE), or its
    default: every ``no_rope_layer_interval``-th layer without."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    return tuple(bool(f) for f in flags)


def config_from_dict(cfg: dict[str, Any], source: str = "") -> ModelConfig:
    where = f" ({source})" if source else ""
    model_type = cfg.get("model_type")
    if model_type in WRAPPERS:
        return _text_model_config(cfg, model_type, source)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r}{where} is not supported; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ValueError(f"config field {key!r} is missing{where}")
    family = FAMILIES[model_type]
    if cfg.get("mlp_bias"):
        raise ValueError(f"mlp_bias=true{where} is not supported (the MLP projections here have no bias)")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention=true{where} is not supported: this library trains "
                         f"causal language models")
    rope_local = None
    if model_type == "gemma3_text":
        rope, rope_local = _gemma3_ropes(cfg)
    else:
        rope = _rope_parameters(cfg)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    partial = 1.0 if partial is None else float(partial)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    scalar = cfg.get("query_pre_attn_scalar")
    windows, window = _layer_windows(cfg, model_type, cfg["num_hidden_layers"], where)
    bias = bool(cfg.get("attention_bias", False))
    granite = model_type == "granite"
    return ModelConfig(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rope=rope,
        rope_local=rope_local,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _GEMMA)),
        norm_offset=family["norm_offset"],
        act=family["act"],
        embed_scale=math.sqrt(cfg["hidden_size"]) if family["scale_embeddings"] else 1.0,
        input_multiplier=float(cfg.get("embedding_multiplier", 1.0)) if granite else 1.0,
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)) if granite else 1.0,
        logits_scaling=float(cfg.get("logits_scaling", 1.0)) if granite else 1.0,
        rope_layers=_smollm3_rope_layers(cfg, cfg["num_hidden_layers"]) if model_type == "smollm3" else (),
        post_norms=family["post_norms"],
        qk_norm_full=model_type == "olmo2",
        sliding_window=window,
        layer_windows=windows,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        attn_scale=(float(cfg["attention_multiplier"]) if granite and "attention_multiplier" in cfg
                    else scalar**-0.5 if scalar else None),
        attention_bias=bias if family["qkv_bias"] is None else family["qkv_bias"],
        o_bias=bias if family["o_bias"] is None else family["o_bias"],
        qk_norm=family["qk_norm"],
        sandwich_norms=family["sandwich_norms"],
        fused_projections=family["fused_projections"],
        partial_rotary_factor=partial,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        source=source,
        raw=dict(cfg),
    ).validate()


def read_config(path: str | Path) -> ModelConfig:
    """Parse ``config.json`` (a file or the folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a model folder needs a config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(cfg, str(path))
