"""Our decoder against transformers' own model on the same random checkpoints (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel

ROPES = {
    "default": {},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
}


def _load(path, **kw):
    kw.setdefault("load_in_4bit", False)
    model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, device="cpu", **kw)
    return model.eval()


def _compare(hf, ours, ids, **kw):
    with torch.no_grad():
        ref = hf(ids, **kw).logits
        got = ours(ids, **kw).logits
    return rel_err(got, ref)


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(num_attention_heads=6, num_key_value_heads=6)),   # GQA ratio 1
    ("llama", dict(num_attention_heads=6, num_key_value_heads=3)),   # 2
    ("llama", dict(num_attention_heads=4, num_key_value_heads=1, hidden_size=88)),  # 4, head_dim 22
    ("llama", dict(tie_word_embeddings=True, head_dim=10)),          # explicit head_dim, tied (Llama 3.2)
    ("mistral", dict(sliding_window=7)),                              # window shorter than the sequence
    ("gemma", dict()),                                                # tied, 1 + w norms, GeGLU, √h scale
    ("gemma2", dict(num_hidden_layers=3)),        # sandwich norms, soft-caps, every other layer slides
    ("qwen2", dict()),                                                # q, k, v biases
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),  # layer 1 slides
    ("qwen3", dict()),                                                # q and k RMS-normed per head
    ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),   # biases on all four, tied
    ("llama", dict(attention_bias=True)),                             # q, k, v and o biases
    ("gemma3_text", dict(num_hidden_layers=3)),   # q/k norms, sandwich norms, local and global RoPE
    ("gemma3_text", dict(num_hidden_layers=4, tie_word_embeddings=False)),
    ("phi3", dict()),                                                 # fused qkv_proj and gate_up_proj
    ("phi3", dict(sliding_window=7)),
    ("granite", dict()),                          # embedding, residual, attention and logit scales
    ("smollm3", dict(num_hidden_layers=4)),                          # layer 3 without RoPE
    ("smollm3", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=5)),  # it slides
    ("olmo2", dict()),                            # post norms, q/k normalized over all heads
], ids=["gqa1", "gqa2", "gqa4", "tied-headdim", "mistral-window", "gemma", "gemma2", "qwen2", "qwen2-window",
        "qwen3", "qwen3-bias-tied", "llama-bias", "gemma3", "gemma3-untied", "phi3", "phi3-window", "granite",
        "smollm3", "smollm3-window", "olmo2"])
def test_logits_match_transformers(tmp_path, family, overrides):
    hf = write_hf_model(tmp_path, family, **overrides)
    ours = _load(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    assert _compare(hf, ours, ids) < 1e-5


def test_phi3_longrope_matches_transformers(tmp_path):
    """Phi-3's long-context RoPE: the short factors up to the original context, the long ones
    past it (and back), cos/sin scaled by √(1 + ln s / ln L₀)."""
    g = torch.Generator().manual_seed(5)
    scaling = {"rope_type": "longrope", "long_factor": (1 + torch.rand(8, generator=g) * 3).tolist(),
               "short_factor": (1 + torch.rand(8, generator=g) * 0.5).tolist()}
    hf = write_hf_model(tmp_path, "phi3", head_dim=16, hidden_size=96, max_position_embeddings=64,
                        original_max_position_embeddings=16, rope_scaling=scaling)
    ours = _load(tmp_path)
    assert ours.cfg.rope_type == "longrope"
    for n in (12, 29, 10):  # short, long, short again
        ids = torch.randint(0, hf.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
        assert _compare(hf, ours, ids) < 1e-5, n


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_scalings_match_transformers(tmp_path, rope):
    hf = write_hf_model(tmp_path, "llama", max_position_embeddings=24, **ROPES[rope])
    ours = _load(tmp_path)
    # 37 > 24: dynamic NTK rescales, llama3/yarn are exercised past the original length
    ids = torch.randint(0, hf.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(2))
    assert _compare(hf, ours, ids) < 1e-5


def test_transformers5_rope_parameters_form(tmp_path):
    import json

    write_hf_model(tmp_path, "llama", **ROPES["llama3"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = dict(cfg.pop("rope_scaling", None) or cfg.get("rope_parameters") or {})
    params["rope_theta"] = cfg.pop("rope_theta", params.get("rope_theta", 10000.0))
    cfg["rope_parameters"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = _load(tmp_path)
    assert ours.cfg.rope_type == "llama3" and ours.cfg.rope["factor"] == 8.0


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi3", "granite",
                                    "smollm3", "olmo2"])
def test_loss_and_input_embedding_gradients_match(tmp_path, family):
    hf = write_hf_model(tmp_path, family)
    ours = _load(tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 21), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100
    emb_ref = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
    emb_got = emb_ref.detach().clone().requires_grad_(True)
    loss_ref = hf(inputs_embeds=emb_ref, labels=labels).loss
    loss_got = ours(inputs_embeds=emb_got, labels=labels).loss
    loss_ref.backward()
    loss_got.backward()
    assert abs(loss_got.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert rel_err(emb_got.grad, emb_ref.grad) < 1e-4


def test_left_padded_batch_matches_on_real_tokens(tmp_path):
    hf = write_hf_model(tmp_path, "llama")
    ours = _load(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(got[real], ref[real]) < 1e-5


def test_packed_rows_equal_separate_sequences(tmp_path):
    hf = write_hf_model(tmp_path, "llama")
    ours = _load(tmp_path)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, hf.config.vocab_size, (n,), generator=g) for n in (9, 1, 14)]
    packed = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=pos).logits[0]
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    assert rel_err(got, ref) < 1e-5


def test_num_items_in_batch_gives_sum_over_count(tmp_path):
    write_hf_model(tmp_path, "llama")
    ours = _load(tmp_path)
    ids = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(6))
    mean = ours(ids, labels=ids).loss
    summed = ours(ids, labels=ids, num_items_in_batch=1).loss
    assert torch.allclose(summed, mean * 2 * 12, rtol=1e-6)


@pytest.mark.parametrize("family,config,want", [
    # configs written before transformers 5 have no layer_types: its rules decide them
    ("gemma2", dict(num_hidden_layers=4, sliding_window=9), (9, None, 9, None)),
    ("gemma3_text", dict(num_hidden_layers=7, sliding_window=9, layer_types=None), (9,) * 5 + (None, 9)),
    ("qwen2", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=9, max_window_layers=3),
     (None, None, None, 9)),
    ("qwen2", dict(num_hidden_layers=4, use_sliding_window=False, sliding_window=9), ()),
    ("mistral", dict(num_hidden_layers=2, sliding_window=9), (9, 9)),
    ("phi3", dict(num_hidden_layers=2, sliding_window=9), (9, 9)),
    ("smollm3", dict(num_hidden_layers=8, use_sliding_window=True, sliding_window=9, no_rope_layers=None),
     (None, None, None, 9, None, None, None, 9)),
    ("mistral", dict(num_hidden_layers=2, sliding_window=None), ()),
    ("llama", dict(num_hidden_layers=2), ()),
])
def test_layer_windows_without_layer_types(tmp_path, family, config, want):
    import json

    from fastqlora.models.families import read_config

    write_hf_model(tmp_path, family, **config)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("layer_types", None)
    path.write_text(json.dumps(raw))
    assert read_config(tmp_path).layer_windows == want


def test_config_errors_name_the_key_and_file(tmp_path):
    import json

    from fastqlora.models.families import read_config

    write_hf_model(tmp_path, "gemma2", num_hidden_layers=2)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "layer_types": ["sliding_attention", "chunked_attention"]}))
    with pytest.raises(ValueError, match=r"layer_types \(.*config\.json\) must be a list of .*'chunked_attention'"):
        read_config(tmp_path)
    path.write_text(json.dumps({**raw, "layer_types": ["sliding_attention"]}))
    with pytest.raises(ValueError, match=r"layer_types in .*config\.json lists 1 layers but num_hidden_layers=2"):
        read_config(tmp_path)
    write_hf_model(tmp_path, "llama", mlp_bias=True)
    with pytest.raises(ValueError, match=r"mlp_bias=true \(.*config\.json\) is not supported"):
        read_config(tmp_path)


def test_gemma3_config_before_transformers_5(tmp_path):
    """Gemma 3 configs on the Hub from before transformers 5: rope_theta + rope_scaling for the
    full layers, rope_local_base_freq for the sliding ones, sliding_window_pattern."""
    import json

    from fastqlora.models.families import read_config

    write_hf_model(tmp_path, "gemma3_text", num_hidden_layers=4)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    for key in ("layer_types", "rope_parameters"):
        raw.pop(key, None)
    raw.update(rope_theta=500_000.0, rope_local_base_freq=20_000.0, sliding_window_pattern=2,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    path.write_text(json.dumps(raw))
    cfg = read_config(tmp_path)
    assert cfg.rope == {"rope_type": "linear", "factor": 8.0, "rope_theta": 500_000.0}
    assert cfg.rope_local == {"rope_type": "default", "rope_theta": 20_000.0}
    assert cfg.layer_windows == (6, None, 6, None)
    assert [cfg.local_rope(i) for i in range(4)] == [True, False, True, False]
    path.write_text(json.dumps({**raw, "use_bidirectional_attention": True}))
    with pytest.raises(ValueError, match=r"use_bidirectional_attention=true .*config\.json.* not supported"):
        read_config(tmp_path)


@pytest.mark.parametrize("factor", [0.75, 0.5])
def test_partial_rotary_matches_transformers(tmp_path, factor):
    """Phi-4-mini rotates the first 3/4 of each head; the rest passes through."""
    hf = write_hf_model(tmp_path, "phi3", head_dim=16, hidden_size=96, partial_rotary_factor=factor)
    ours = _load(tmp_path)
    assert ours.cfg.rotary_dim == int(16 * factor)
    ids = torch.randint(0, hf.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(8))
    assert _compare(hf, ours, ids) < 1e-5
