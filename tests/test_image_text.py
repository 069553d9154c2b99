"""Image-text checkpoints (Gemma 3's gemma3, Mistral Small 3.1's mistral3) trained as their
text model: logits against transformers' image-text model on text, adapters that PEFT loads
onto that model (and back), and merged checkpoints that transformers loads whole, vision
tower included (fp32, CPU)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err, write_hf_image_text

from fastqlora import FastLanguageModel
from fastqlora.lora import iter_adapters

peft = pytest.importorskip("peft")


def _ours(path, **kw):
    kw.setdefault("load_in_4bit", False)
    model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, device="cpu", **kw)
    return model


def _ids(seed=0, shape=(2, 23)):
    return torch.randint(0, 290, shape, generator=torch.Generator().manual_seed(seed))


FAMILIES = ["gemma3", "mistral3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match_transformers(tmp_path, family):
    hf = write_hf_image_text(tmp_path, family)
    ours = _ours(tmp_path).eval()
    assert ours.cfg.wrapper == family and ours.cfg.model_type == {"gemma3": "gemma3_text", "mistral3": "mistral"}[family]
    if family == "gemma3":
        assert ours.cfg.layer_windows == (6, None, 6) and ours.cfg.rope_local["rope_theta"] == 10000.0
    assert ours.passthrough and all(k.startswith(("vision_tower.", "multi_modal_projector."))
                                    for _, k, _ in ours.passthrough)
    ids = _ids()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_in_peft_on_the_image_text_model_and_back(tmp_path, family):
    hf = write_hf_image_text(tmp_path / "base", family)
    ours = FastLanguageModel.get_peft_model(_ours(tmp_path / "base"), r=4, lora_alpha=8,
                                            use_gradient_checkpointing=False)
    with torch.no_grad():
        for _, _, a in iter_adapters(ours):
            a.lora_B.normal_(0, 0.05)
    ours.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str) and "language_model" in cfg["target_modules"]
    ids = _ids(1)
    with torch.no_grad():
        want = ours.eval()(ids).logits
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # the regex kept PEFT's adapters off the vision tower
    assert not [n for n, _ in loaded.named_modules() if "vision_tower" in n and n.endswith("lora_A")]
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, want) < 1e-5
    mine, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), load_in_4bit=False,
                                                dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert rel_err(mine.eval()(ids).logits, want) < 1e-5


def test_peft_adapter_of_the_image_text_model_loads_here(tmp_path):
    hf = write_hf_image_text(tmp_path / "base")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
                           task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf, lcfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / "peft_adapter")
    f = tmp_path / "peft_adapter" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "base_model_name_or_path": str(tmp_path / "base")}))
    mine, _ = FastLanguageModel.from_pretrained(str(tmp_path / "peft_adapter"), load_in_4bit=False,
                                                dtype=torch.float32, device="cpu")
    assert sorted(mine.peft_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    ids = _ids(2)
    with torch.no_grad():
        assert rel_err(mine.eval()(ids).logits, ref.eval()(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("family,load_in_4bit", [("gemma3", False), ("gemma3", True), ("mistral3", False)])
def test_merged_checkpoint_is_the_whole_image_text_model(tmp_path, family, load_in_4bit):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    hf = write_hf_image_text(tmp_path / "base", family)
    ours = FastLanguageModel.get_peft_model(_ours(tmp_path / "base", load_in_4bit=load_in_4bit), r=4,
                                            lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():
        for _, _, a in iter_adapters(ours):
            a.lora_B.normal_(0, 0.05)
    ours.save_pretrained_merged(tmp_path / "merged", dtype=torch.float32)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == family
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    ids = _ids(4)
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).logits, ours.eval()(ids).logits) < 1e-5
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    source = load_file(str(tmp_path / "base" / "model.safetensors"))
    vision = [k for k in source if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(torch.equal(saved[k], source[k]) for k in vision)
    assert not [k for k in saved if k.startswith("model.")]  # the text model under language_model.


def test_prequantized_image_text_checkpoint(tmp_path):
    """A bnb-4bit image-text checkpoint (as transformers writes it, vision tower quantized too)
    loads with its language model's NF4 tensors as they are; a merged checkpoint is refused
    with the reason, since its 4-bit vision tensors cannot be copied into a 16-bit one."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, Gemma3ForConditionalGeneration

    write_hf_image_text(tmp_path / "base")
    q = Gemma3ForConditionalGeneration.from_pretrained(
        tmp_path / "base", dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(tmp_path / "bnb4")
    pre = _ours(tmp_path / "bnb4", load_in_4bit=True)
    fresh = _ours(tmp_path / "base", load_in_4bit=True)
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(pre.get_submodule(name).dense_weight(), fresh.get_submodule(name).dense_weight())
    ids = _ids(5, (1, 17))
    with torch.no_grad():
        assert torch.equal(pre.eval()(ids).logits, fresh.eval()(ids).logits)
    assert any(quantized for _, _, quantized in pre.passthrough)
    with pytest.raises(ValueError, match=r"stored in 4 bits .* merge onto the 16-bit original"):
        pre.save_pretrained_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
