"""A whole model on the GPU with every kernel on gives the loss and LoRA gradients of the
same model on the reference ops (bf16 tolerance), 4-bit base, packed rows included."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err, write_hf_model

from fastqlora import FastLanguageModel
from fastqlora.ops import backend

pytestmark = pytest.mark.gpu


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
