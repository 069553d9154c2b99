"""LoRA against PEFT on transformers' model (fp32, CPU): loss, gradients, training
curves, adapter files both ways, merged checkpoints, gradient accumulation."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel
from fastqlora.lora import LINEAR_TARGETS, iter_adapters

peft = pytest.importorskip("peft")


PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _pair(tmp_path, r=6, alpha=10, use_rslora=False, family="llama", targets=LINEAR_TARGETS):
    """transformers+PEFT and fastqlora on the same weights with the same (non-zero) adapters.
    Ours always gets ``targets``; PEFT gets Phi-3's fused names for Phi-3 (ours maps to them)."""
    hf = write_hf_model(tmp_path, family)
    peft_targets = PHI3_TARGETS if family == "phi3" else list(targets)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=peft_targets,
                          use_rslora=use_rslora, task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf, cfg)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                device="cpu")
    ours = FastLanguageModel.get_peft_model(ours, r=r, lora_alpha=alpha, target_modules=list(targets),
                                            use_rslora=use_rslora, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, _, adapter in iter_adapters(ours):
            peft_layer = ref.base_model.model.get_submodule(name)
            peft_layer.lora_B["default"].weight.copy_(torch.randn(peft_layer.lora_B["default"].weight.shape,
                                                                  generator=g) * 0.05)
            adapter.lora_A.copy_(peft_layer.lora_A["default"].weight)
            adapter.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return ref, ours


def _grads(ref, ours):
    pairs = []
    for name, _, adapter in iter_adapters(ours):
        layer = ref.base_model.model.get_submodule(name)
        pairs.append((adapter.lora_A.grad, layer.lora_A["default"].weight.grad))
        pairs.append((adapter.lora_B.grad, layer.lora_B["default"].weight.grad))
    return pairs


@pytest.mark.parametrize("r,alpha,rslora,family", [(6, 10, False, "llama"), (4, 16, True, "llama"),
                                                  (6, 10, False, "gemma2"), (6, 10, False, "qwen2"),
                                                  (6, 10, False, "qwen3"), (6, 10, False, "gemma3_text"),
                                                  (6, 10, False, "phi3"), (6, 10, False, "granite"),
                                                  (6, 10, False, "smollm3"), (6, 10, False, "olmo2")],
                         ids=["r6-a10", "rslora", "gemma2", "qwen2", "qwen3", "gemma3", "phi3", "granite", "smollm3",
                              "olmo2"])
def test_loss_and_lora_gradients_match_peft(tmp_path, r, alpha, rslora, family):
    ref, ours = _pair(tmp_path, r, alpha, rslora, family=family)
    ids = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :4] = -100
    loss_ref = ref(input_ids=ids, labels=labels).loss
    loss_got = ours(input_ids=ids, labels=labels).loss
    loss_ref.backward()
    loss_got.backward()
    assert abs(loss_got.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    pairs = _grads(ref, ours)
    assert len(pairs) == 2 * (4 if family == "phi3" else 7) * 2
    for got, want in pairs:
        assert rel_err(got, want) < 1e-5
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter.lora_" in n for n in trainable)


def test_twenty_steps_of_adamw_track_peft(tmp_path):
    ref, ours = _pair(tmp_path, r=8, alpha=16)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
    opt_got = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        ids = torch.randint(0, 211, (2, 15), generator=g)
        for model, opt in ((ref, opt_ref), (ours, opt_got)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            model._last = loss.item()
        assert abs(ours._last - ref._last) < 1e-4


def test_adapter_files_round_trip_with_peft(tmp_path):
    ref, ours = _pair(tmp_path / "base", r=4, alpha=8)
    ids = torch.randint(0, 211, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    # ours -> peft
    ours.peft_config["base_model_name_or_path"] = str(tmp_path / "base")
    ours.save_pretrained(tmp_path / "ours_adapter")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours_adapter").eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, want) < 1e-5
    # peft -> ours (the base is found from the adapter config)
    ref.save_pretrained(tmp_path / "peft_adapter")
    import json

    cfg_file = tmp_path / "peft_adapter" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")
    cfg_file.write_text(json.dumps(cfg))
    mine, _ = FastLanguageModel.from_pretrained(str(tmp_path / "peft_adapter"), load_in_4bit=False,
                                                dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert rel_err(mine.eval()(ids).logits, want) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi3", "granite", "smollm3",
                                    "olmo2"])
def test_merged_checkpoint_loads_in_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    _, ours = _pair(tmp_path / "base", r=4, alpha=8, family=family)
    ours.save_pretrained_merged(tmp_path / "merged", tokenizer=None, max_shard_size=60_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    # eager: transformers' SDPA path for Gemma 2 differs from its own eager one by ~1.6e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    ids = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, ours.eval()(ids).logits) < 1e-5


def test_merged_from_4bit_base(tmp_path):
    from transformers import AutoModelForCausalLM

    write_hf_model(tmp_path / "base", "llama", hidden_size=128, intermediate_size=192, num_attention_heads=4,
                   num_key_value_heads=2)
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), load_in_4bit=True, dtype=torch.float32,
                                                device="cpu")
    ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8)
    with torch.no_grad():
        for _, _, a in iter_adapters(ours):
            a.lora_B.normal_(0, 0.05)
    ours.save_pretrained_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 211, (1, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, ours.eval()(ids).logits) < 1e-5


def test_gradient_accumulation_equals_one_batch(tmp_path):
    _, ours = _pair(tmp_path, r=4, alpha=8)
    g = torch.Generator().manual_seed(6)
    lengths = [5, 17, 9, 12]
    rows = [torch.randint(0, 211, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), -100)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = row, row, 1
    params = [p for p in ours.parameters() if p.requires_grad]
    big = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    big.backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    total = sum(len(r) - 1 for r in rows)
    acc = 0.0
    for row in rows:
        loss = ours(input_ids=row[None], labels=row[None], num_items_in_batch=total).loss
        loss.backward()
        acc += loss.item()
    assert abs(acc - big.item()) < 1e-5 * big.item()
    for p, w in zip(params, want):
        assert rel_err(p.grad, w) < 1e-5


def test_bad_arguments_are_explained(tmp_path):
    write_hf_model(tmp_path, "llama")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32,
                                                 device="cpu")
    with pytest.raises(ValueError, match="unknown target_modules"):
        FastLanguageModel.get_peft_model(model, target_modules=["qkv"])
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="sometimes")
    with pytest.raises(ValueError, match="bias"):
        FastLanguageModel.get_peft_model(model, bias="all")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        model.save_pretrained(tmp_path / "x")


def test_fused_projections_take_whole_groups(tmp_path):
    write_hf_model(tmp_path, "phi3")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"q_proj, k_proj, v_proj as one projection \(qkv_proj\).*not q_proj"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    assert model.peft_config["target_modules"] == ["qkv_proj", "down_proj"]


def test_merged_4bit_loads_in_transformers_with_bitsandbytes(tmp_path):
    """save_method="merged_4bit": the merged projections quantized again to NF4 in transformers'
    bnb-4bit format. transformers + bitsandbytes load it as it is (their dequantized weights equal
    ours bit for bit), so does this library, and it is the 16-bit merge quantized on loading."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from fastqlora.models.linear import FrozenLinear

    _, ours = _pair(tmp_path / "base", r=4, alpha=8)
    ours.save_pretrained_merged(tmp_path / "m4", save_method="merged_4bit", dtype=torch.float32)
    ours.save_pretrained_merged(tmp_path / "m16", dtype=torch.float32)
    hf4 = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map={"": "cpu"}, dtype=torch.float32).eval()
    mine4, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=True, dtype=torch.float32,
                                                 device="cpu")
    # the 16-bit merge quantized on loading: the same quantizer on the same weights
    m16, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m16"), load_in_4bit=True, dtype=torch.float32,
                                               device="cpu")
    import bitsandbytes.functional as bnbf

    # (bitsandbytes' CPU 4-bit matmul does not take these small shapes: compare the weights)
    layers = [n for n, m in mine4.named_modules() if isinstance(m, FrozenLinear) and n != "lm_head"]
    assert len(layers) == 14
    for name in layers:
        layer = hf4.get_submodule(name)
        want = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        mine = mine4.get_submodule(name)
        assert mine.is_quantized and torch.equal(mine.dense_weight(torch.float32), want.float()), name
    ids = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(mine4.eval()(ids).logits, m16.eval()(ids).logits)
    with pytest.raises(ValueError, match="save_method 'gguf' is not supported"):
        ours.save_pretrained_merged(tmp_path / "x", save_method="gguf")


def test_disable_adapter_gives_the_base(tmp_path):
    """PEFT's disable_adapter(): inside, the base model's logits (PEFT's own, on the same
    weights); after, the adapted model's again."""
    ref, ours = _pair(tmp_path, r=4, alpha=8)
    ids = torch.randint(0, 211, (2, 11), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        adapted = ours.eval()(ids).logits
        with ref.disable_adapter():
            base_ref = ref.eval()(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(ids).logits
        again = ours(ids).logits
    assert rel_err(base, base_ref) < 1e-5 and rel_err(adapted, base_ref) > 1e-3
    assert torch.equal(again, adapted)
