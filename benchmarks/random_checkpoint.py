"""Write a random-weight checkpoint of a real model's shape (no weights exist on the lent
GPU): sharded safetensors with an index and a config.json, weights ~ N(0, 0.02²)
(norms 1), generated on the GPU so that an 8B checkpoint takes seconds, not minutes.

    python benchmarks/random_checkpoint.py --shape llama-3-8b --out /tmp/ckpt
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# name -> (family config, config.json fields). The family sets the tensors a layer has.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                       max_position_embeddings=131072, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=131072, max_window_layers=28),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, attention_bias=False),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=10000.0,
                       rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       hidden_activation="gelu_pytorch_tanh"),
    "gemma-3-4b-text": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                            num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=1_000_000.0,
                            rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                            rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=1024,
                            sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh"),
    "phi-3.5-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=96,
                         tie_word_embeddings=False, max_position_embeddings=131072,
                         original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                         sliding_window=262144, pad_token_id=32000, eos_token_id=32000,
                         # the factors' values do not change the work; these are smooth stand-ins
                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 96 for i in range(48)],
                                       "long_factor": [1.0 + i / 2 for i in range(48)]}),
    "granite-3.1-8b": dict(model_type="granite", vocab_size=49155, hidden_size=4096, intermediate_size=12800,
                           num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=10_000_000.0,
                           rms_norm_eps=1e-5, embedding_multiplier=12.0, residual_multiplier=0.22,
                           attention_multiplier=0.0078125, logits_scaling=16.0),
    "olmo-2-7b": dict(model_type="olmo2", vocab_size=100352, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                      tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=500000.0,
                      rms_norm_eps=1e-6),
    "smollm3-3b": dict(model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                       tie_word_embeddings=True, max_position_embeddings=65536, rope_theta=5_000_000.0,
                       rms_norm_eps=1e-6, no_rope_layer_interval=4, use_sliding_window=False),
}
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
         "granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint and its shape, by the family's layer layout (q/k/v biases
    for Qwen 2, per-head q/k norms for Qwen 3 and Gemma 3, sandwich norms for Gemma 2 and 3,
    fused projections for Phi-3, output norms and whole-projection q/k norms for OLMo 2)."""
    family = cfg.get("model_type", "llama")
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        if family == "phi3":  # fused projections
            out += [(p + "self_attn.qkv_proj.weight", (q + 2 * kv, h)), (p + "mlp.gate_up_proj.weight", (2 * i, h))]
        else:
            out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h))]
        out += [(p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.down_proj.weight", (h, i))]
        if family != "olmo2":  # OLMo 2 normalizes block outputs only
            out.append((p + "input_layernorm.weight", (h,)))
        if family == "olmo2":
            out += [(p + "self_attn.q_norm.weight", (q,)), (p + "self_attn.k_norm.weight", (kv,)),
                    (p + "post_feedforward_layernorm.weight", (h,))]
        if family == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
        if family in ("qwen3", "gemma3_text"):
            out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
        if family in ("gemma2", "gemma3_text"):
            out += [(p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out


def write_random_checkpoint(path: str | Path, shape: str = "llama-3-8b", dtype: torch.dtype = torch.bfloat16,
                            device: str = "cuda", max_shard_bytes: float = 5e9, seed: int = 0) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[shape])
    g = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    gemma = cfg.get("model_type", "llama").startswith("gemma")
    for name, shp in tensor_shapes(cfg):
        if name.endswith("norm.weight"):  # unit scale: 1, or 0 under Gemma's 1 + w
            t = torch.zeros(shp, dtype=dtype) if gemma else torch.ones(shp, dtype=dtype)
        else:
            t = (torch.randn(shp, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    family = cfg.get("model_type", "llama")
    config = {"architectures": [_ARCH[family]], "model_type": family, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": str(dtype).removeprefix("torch."), **cfg}
    if family == "llama":
        config.update(attention_bias=False, bos_token_id=128000, eos_token_id=128001)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    write_random_checkpoint(args.out, args.shape)
    print(f"wrote {args.shape} to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
