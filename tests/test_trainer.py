"""The article-style flow, transformers.Trainer and trl.SFTTrainer on the bundled tiny
model (4-bit base, CPU)."""
from __future__ import annotations

import os

import pytest
import torch

from fastqlora import FastLanguageModel
from fastqlora.demo import data_dir


def _model(**peft_kwargs):
    model, tok = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), max_seq_length=128,
                                                   load_in_4bit=True, device="cpu")
    kw = dict(r=8, lora_alpha=16, lora_dropout=0, bias="none",
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              use_gradient_checkpointing=True, random_state=3407)
    kw.update(peft_kwargs)
    return FastLanguageModel.get_peft_model(model, **kw), tok


def test_article_snippet_runs_end_to_end(tmp_path):
    model, tok = _model(use_gradient_checkpointing="unsloth")
    ids = tok(["The capital of Chile is Santiago."] * 2, return_tensors="pt")["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    FastLanguageModel.for_inference(model)
    prompt = tok("The capital of", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5)
    assert out.shape[0] == 1 and 1 <= out.shape[1] - prompt["input_ids"].shape[1] <= 5
    FastLanguageModel.for_training(model)
    assert model.training
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tok, n=8):
        self.ids = [tok(f"The capital of France is Paris. {i}")["input_ids"] for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": torch.tensor(self.ids[i]), "labels": torch.tensor(self.ids[i])}


def test_transformers_trainer_trains_it(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tok = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no",
                             use_cpu=True)
    result = Trainer(model=model, args=args, train_dataset=_Rows(tok)).train()
    assert result.training_loss > 0
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="trains on the CPU, where trl's own Triton kernel needs TRITON_INTERPRET=1")
def test_trl_sft_trainer_trains_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model, tok = _model()
    ds = datasets.Dataset.from_list([{"text": f"The capital of Spain is Madrid. {i}"} for i in range(6)])
    cfg = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, max_length=64)
    result = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok).train()
    assert result.training_loss > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="trains on the CPU, where trl's own Triton kernel needs TRITON_INTERPRET=1")
def test_trl_dpo_trainer(tmp_path):
    """trl's DPOTrainer drives the model (reference log-probs precomputed from the model
    itself at the start, where LoRA's B = 0 makes it the base): the first step's loss is
    log 2, policy and reference agreeing exactly, and training moves it."""
    import math

    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    model, tok = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True, device="cpu",
                                                   dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    data = datasets.Dataset.from_list([{"prompt": "Capital of Peru?", "chosen": " Lima.", "rejected": " Paris."},
                                       {"prompt": "Capital of Chile?", "chosen": " Santiago.",
                                        "rejected": " Rome."}] * 4)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, use_cpu=True,
                     report_to=[], save_strategy="no", learning_rate=5e-3, logging_steps=1, beta=0.1, max_length=64,
                     precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < losses[0]
