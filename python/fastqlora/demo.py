"""``fastqlora demo``: QLoRA on the bundled tiny model and dataset, anywhere, CPU included.

The bundled model is a 4-layer Llama with random weights and a small byte-level BPE
tokenizer; the dataset asks for the capitals of 32 countries. Before finetuning the
model babbles; after about a minute on two CPU cores it answers in the trained form.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

from .train.data import ALPACA_NO_INPUT

DEMO_PROMPTS = ("What is the capital of Japan?", "Which city is the capital of Peru?")
DEFAULT_STEPS = 400


def data_dir() -> Path:
    return Path(str(resources.files("fastqlora") / "data"))


def _answer(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    from .api import FastLanguageModel

    FastLanguageModel.for_inference(model)
    prompt = ALPACA_NO_INPUT.format(instruction=question)
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    FastLanguageModel.for_training(model)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def run_demo(steps: int | None = None, output_dir: str | Path = "fastqlora-demo", device: str | None = None,
             progress: bool = True) -> list[dict[str, float]]:
    """Finetune, print answers before and after, and return the loss history."""
    from .api import FastLanguageModel
    from .train import TrainConfig, Trainer

    torch.manual_seed(0)
    root = data_dir()
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(root / "demo_model"), max_seq_length=512, load_in_4bit=True, device=device
    )
    n = sum(p.numel() for p in model.parameters()) + sum(
        m.out_features * m.in_features for m in model.modules() if getattr(m, "is_quantized", False))
    print(f"fastqlora demo: a tiny Llama ({n:,} weights, projections in NF4) on {model.device}")
    before = {q: _answer(model, tokenizer, q) for q in DEMO_PROMPTS}
    cfg = TrainConfig(
        model=str(root / "demo_model"), dataset=str(root / "demo.jsonl"), output_dir=str(output_dir),
        max_seq_length=512, r=16, lora_alpha=16, batch_size=2, learning_rate=5e-3, lr_scheduler="constant",
        warmup_steps=10, max_steps=steps or DEFAULT_STEPS, completion_only=True, packing=True,
        use_gradient_checkpointing=False, progress=progress,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
        use_gradient_checkpointing=cfg.use_gradient_checkpointing, random_state=cfg.seed,
    )
    t0 = time.perf_counter()
    history = Trainer(model, tokenizer, cfg).train()
    seconds = time.perf_counter() - t0
    k = max(1, len(history) // 10)
    first = sum(h["loss"] for h in history[:k]) / k
    last = sum(h["loss"] for h in history[-k:]) / k
    print(f"\n{len(history)} steps in {seconds:.0f} s: loss {first:.3f} -> {last:.3f} "
          f"(mean of the first and last {k} steps); loss curve in {Path(output_dir) / 'loss.png'}")
    for q in DEMO_PROMPTS:
        print(f"\nQ: {q}\n  before: {before[q]!r}\n  after:  {_answer(model, tokenizer, q)!r}")
    print(f"\nadapter saved to {Path(output_dir) / 'adapter'} (PEFT format)")
    return history
