"""The real model under the three checkpointing modes: bit for bit the same loss and LoRA
gradients (fp32, CPU), including packed rows and dropout."""
from __future__ import annotations

import pytest
import torch

from fastqlora import FastLanguageModel
from fastqlora.demo import data_dir


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offload_checkpoint_and_plain_agree_bit_for_bit(dropout):
    model, tok = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=dropout)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (2, 45), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(25)]).expand(2, -1)
    results = {}
    for mode in ("off", "checkpoint", "offload"):
        model.gradient_checkpointing = mode
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)  # the same dropout masks in every mode
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    ref_loss, ref_grads = results["off"]
    for mode in ("checkpoint", "offload"):
        loss, grads = results[mode]
        assert torch.equal(loss, ref_loss), mode
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), mode


def test_long_sequences_tile_the_mlp_with_the_same_result(monkeypatch):
    import fastqlora.models.decoder as decoder

    model, _ = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="offload")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    ids = torch.randint(0, 400, (1, 600), generator=torch.Generator().manual_seed(1))
    out = {}
    for above in (10**9, 100):  # untiled, then tiles of 256 tokens
        monkeypatch.setattr(decoder, "MLP_TILE_ABOVE", above)
        if above == 100:
            monkeypatch.setattr(decoder, "MLP_TILE_BYTES", 256 * 8 * 352 * 4)
            calls = []
            real = decoder.tiled_apply
            monkeypatch.setattr(decoder, "tiled_apply", lambda *a, **k: calls.append(1) or real(*a, **k))
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[above] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert calls  # the tiled path ran
    (l1, g1), (l2, g2) = out[10**9], out[100]
    assert abs(l1 - l2) < 1e-6 * abs(l1)
    assert all(float((a - b).norm() / b.norm()) < 1e-5 for a, b in zip(g2, g1))
