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
