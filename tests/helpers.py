"""Tiny random checkpoints written by transformers, for tests that compare against it."""
from __future__ import annotations

from pathlib import Path

import torch

_DEFAULTS = dict(vocab_size=211, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64)


def hf_config(family: str = "llama", **overrides):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    kwargs = {**_DEFAULTS, **overrides}
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
        return MistralConfig(**kwargs)
    if family == "gemma":
        kwargs.setdefault("head_dim", 16)
        kwargs.setdefault("hidden_activation", "gelu_pytorch_tanh")
        return GemmaConfig(**kwargs)
    if family == "gemma2":  # softcaps and windows small enough to matter at test sizes
        kwargs.setdefault("head_dim", 16)
        kwargs.setdefault("sliding_window", 6)
        kwargs.setdefault("query_pre_attn_scalar", 20)
        kwargs.setdefault("attn_logit_softcapping", 2.0)
        kwargs.setdefault("final_logit_softcapping", 3.0)
        cfg = Gemma2Config(**kwargs)
        cfg._attn_implementation = "eager"  # transformers' soft-capping path
        return cfg
    if family == "gemma3_text":  # local and global RoPE differ (theta, and a linear scaling)
        kwargs.setdefault("head_dim", 16)
        kwargs.setdefault("sliding_window", 6)
        kwargs.setdefault("query_pre_attn_scalar", 20)
        kwargs.setdefault("rope_parameters", {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                              "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1_000_000.0}})
        layers = kwargs.get("num_hidden_layers", 3)
        kwargs.setdefault("layer_types", ["sliding_attention" if i % 3 != 1 else "full_attention"
                                          for i in range(layers)])
        cfg = Gemma3TextConfig(**kwargs)
        cfg._attn_implementation = "eager"
        return cfg
    if family == "phi3":
        from transformers import Phi3Config

        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("eos_token_id", 2)
        return Phi3Config(**kwargs)
    if family in ("granite", "smollm3", "olmo2"):
        from transformers import AutoConfig

        if family == "granite":  # scales far from 1 so that each one matters
            for key, value in dict(embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.2,
                                   logits_scaling=4.0).items():
                kwargs.setdefault(key, value)
        kwargs.setdefault("pad_token_id", 0)
        return AutoConfig.for_model(family, **kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs)
    if family == "qwen3":
        kwargs.setdefault("head_dim", 16)
        return Qwen3Config(**kwargs)
    raise ValueError(family)


def write_hf_model(path: Path, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                   randomize_norms: bool = True, **overrides):
    """Write a random transformers model to ``path`` and return it (eval mode, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if randomize_norms:
        _randomize_norms(model)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _randomize_norms(model) -> None:
    """Norms start at 1 (or 0 under Gemma's 1 + w): make them matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def write_hf_image_text(path: Path, family: str = "gemma3", seed: int = 0, **text_overrides):
    """A random image-text model (``gemma3``: SigLIP tower; ``mistral3``: Pixtral tower, both
    tiny) written to ``path``; returned in eval mode with transformers' eager attention."""
    if family == "mistral3":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        torch.manual_seed(seed)
        text = dict(model_type="mistral", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                    tie_word_embeddings=False, **text_overrides)
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14, head_dim=16)
        cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=299, tie_word_embeddings=False)
        cfg._attn_implementation = "eager"
        model = Mistral3ForConditionalGeneration(cfg).eval()
        _randomize_norms(model)
        model.save_pretrained(path, safe_serialization=True)
        return model
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=6,
                query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
                **text_overrides)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    cfg._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(cfg).eval()
    _randomize_norms(model)
    model.save_pretrained(path, safe_serialization=True)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_lora_model(tmp_path, device="cpu", dtype=torch.float32, lora_dropout=0.0, checkpointing=True,
                    family="llama"):
    """A two-layer Llama in NF4 with rank-4 LoRA (B random, so every adapter has a gradient),
    checkpointing on (or ``checkpointing``: False, "offload"): what the graphed training paths'
    tests run."""
    from fastqlora import FastLanguageModel

    write_hf_model(tmp_path, family, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=101, head_dim=16)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=dtype, device=device)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                             use_gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return model


def right_padded_batch(device, seed=0, rows=3, seq=13):
    """Right-padded rows of different lengths (HF's collator), labels -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (rows, seq), generator=g)
    lengths = torch.tensor([seq, seq - 4, seq - 9])[:rows]
    mask = (torch.arange(seq) < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def packed_batch(device):
    """One row of three sequences (trl's padding-free batches): restarting position ids."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 101, (1, 21), generator=g)
    pos = torch.cat([torch.arange(8), torch.arange(6), torch.arange(7)])[None]
    labels = ids.clone()
    labels[0, [0, 8, 14]] = -100
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}
