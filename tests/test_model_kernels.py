"""A whole model with every kernel on gives the loss and LoRA gradients of the same model
on the reference ops, 4-bit base, packed rows included: on the GPU in bf16, and a tiny
model in fp32 on the CPU under the Triton interpreter (CI)."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel
from fastqlora.ops import backend


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_model_kernels_match_reference_ops_fp32(tmp_path, kernel_device, checkpointing):
    write_hf_model(tmp_path, "llama", max_position_embeddings=64, hidden_size=64, intermediate_size=96,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=torch.float32,
                                                 device=kernel_device)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (2, 21), generator=g).to(kernel_device)
    pos = torch.cat([torch.arange(12), torch.arange(9)]).expand(2, -1).to(kernel_device)
    results = {}
    for mode in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with backend(mode):
            loss = model(input_ids=ids, position_ids=pos, labels=ids.clone()).loss
            loss.backward()
        results[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (l_ref, g_ref), (l_k, g_k) = results["reference"], results["triton"]
    assert abs(l_k - l_ref) < 1e-5 * abs(l_ref)
    assert max(rel_err(g_k[n], g_ref[n]) for n in g_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, vocab_size=1003)),
    ("gemma", dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=128, vocab_size=1003)),
    ("mistral", dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=64, vocab_size=1003, sliding_window=100)),
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_kernels_match_reference_ops(tmp_path, family, overrides, checkpointing):
    write_hf_model(tmp_path, family, max_position_embeddings=512, **overrides)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=torch.bfloat16,
                                                 device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1003, (2, 333), generator=g).cuda()
    pos = torch.cat([torch.arange(200), torch.arange(133)]).expand(2, -1).cuda()  # two sequences a row
    labels = ids.clone()
    labels[:, :10] = -100
    results = {}
    for mode in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with backend(mode):
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
            loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = (loss.item(), grads)
    (l_ref, g_ref), (l_k, g_k) = results["reference"], results["triton"]
    assert abs(l_k - l_ref) < 1e-2 * abs(l_ref)
    worst = max(rel_err(g_k[n], g_ref[n]) for n in g_ref)
    assert worst < 3e-2, worst


@pytest.mark.gpu
def test_fused_nf4_projections_match_the_plain_path(tmp_path, monkeypatch):
    write_hf_model(tmp_path, "llama", max_position_embeddings=512, hidden_size=256, intermediate_size=688,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1003)
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=torch.bfloat16,
                                                 device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    ids = torch.randint(0, 1003, (2, 333), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("FASTQLORA_NF4_FUSED", fused)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[fused] = (loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                        if p.requires_grad})
    (l0, g0), (l1, g1) = results["0"], results["1"]
    assert abs(l1 - l0) < 1e-2 * abs(l0)
    assert max(rel_err(g1[n], g0[n]) for n in g0) < 3e-2
