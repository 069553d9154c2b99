"""4-bit loading against transformers + bitsandbytes, pre-quantized checkpoints, and
errors that name the file and the key."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err, write_hf_model
from safetensors.torch import load_file, save_file

from fastqlora import FastLanguageModel
from fastqlora.models.linear import FrozenLinear

bnb_f = pytest.importorskip("bitsandbytes.functional")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
SMALL = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


def _load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    model, _ = FastLanguageModel.from_pretrained(str(path), device="cpu", **kw)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi3", "granite",
                                    "smollm3", "olmo2"])
def test_4bit_matches_transformers_with_bitsandbytes_weights(tmp_path, family):
    hf = write_hf_model(tmp_path, family, **SMALL)
    ours = _load(tmp_path, load_in_4bit=True)
    # transformers' model with every projection replaced by bitsandbytes' NF4 round trip
    # (bitsandbytes' own CPU 4-bit matmul is approximate, so compare on its weights)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.rsplit(".", 1)[-1] in PROJ:
                q, st = bnb_f.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                            quant_type="nf4")
                module.weight.copy_(bnb_f.dequantize_4bit(q, st))
                mine = ours.get_submodule(name)
                assert isinstance(mine, FrozenLinear) and mine.is_quantized
                assert torch.equal(mine.nf4().packed, q.reshape(-1))
    ids = torch.randint(0, 211, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) < 1e-5


def test_prequantized_checkpoint_from_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    write_hf_model(tmp_path / "base", "llama", **SMALL)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=cfg, dtype=torch.float32,
                                             device_map={"": "cpu"})
    q.save_pretrained(tmp_path / "bnb4")
    keys = load_file(tmp_path / "bnb4" / "model.safetensors").keys()
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in keys)
    pre = _load(tmp_path / "bnb4", load_in_4bit=True)
    fresh = _load(tmp_path / "base", load_in_4bit=True)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = pre.get_submodule(name), fresh.get_submodule(name)
        assert torch.equal(a.dense_weight(), b.dense_weight())
    ids = torch.randint(0, 211, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pre(ids).logits, fresh(ids).logits)
    # a pre-quantized checkpoint can also be loaded into 16-bit (dequantized once)
    dense = _load(tmp_path / "bnb4", load_in_4bit=False)
    assert not dense.model.layers[0].mlp.up_proj.is_quantized


def test_sharded_checkpoint_loads(tmp_path):
    hf = write_hf_model(tmp_path / "one", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = _load(tmp_path / "one", load_in_4bit=False), _load(tmp_path / "sharded", load_in_4bit=False)
    ids = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_errors_name_the_file_and_key(tmp_path):
    write_hf_model(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    original = f.read_bytes()

    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        _load(tmp_path, load_in_4bit=False)
    f.write_bytes(original)

    _rewrite(tmp_path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.extra\.weight in .*model\.safetensors"):
        _load(tmp_path, load_in_4bit=False)
    f.write_bytes(original)

    _rewrite(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(5, 72)))
    with pytest.raises(ValueError, match=r"k_proj\.weight in .*model\.safetensors has shape \(5, 72\), expected \(36, 72\)"):
        _load(tmp_path, load_in_4bit=True)
    f.write_bytes(original)

    f.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        _load(tmp_path, load_in_4bit=False)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        _load(tmp_path, load_in_4bit=False)
    f.write_bytes(original)

    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"'gpt_neox'.*config\.json.*supported model types: llama, mistral, gemma, gemma2, qwen2, qwen3, gemma3_text, phi3, granite, smollm3, olmo2"):
        _load(tmp_path)
    cfg_file.write_text(json.dumps({**cfg, "model_type": "gemma3", "text_config": {"model_type": "llama"}}))
    with pytest.raises(ValueError, match=r"text_config\.model_type 'llama' .*config\.json.* should be 'gemma3_text'"):
        _load(tmp_path)
    cfg_file.write_text(json.dumps({**cfg, "model_type": "gemma3"}))
    with pytest.raises(ValueError, match=r"model_type 'gemma3' .*config\.json.* needs a text_config"):
        _load(tmp_path)
    cfg_file.write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match=r"num_attention_heads=6 in .*config\.json is not a multiple of "
                                         r"num_key_value_heads=4"):
        _load(tmp_path)
    cfg_file.write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4, "factor": 2}}))
    with pytest.raises(ValueError, match=r"rope type 'mrope'"):
        _load(tmp_path)
    cfg_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        _load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nowhere")


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"(?s)could not fetch 'no-such-org/no-such-model'.*local folder"):
        FastLanguageModel.from_pretrained("no-such-org/no-such-model")
