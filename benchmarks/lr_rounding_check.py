"""CPU check behind a note in the README's end-to-end section: at a tiny learning rate the
loss of a bf16 model moves by less than bf16 rounding, for PEFT as for fastqlora.

Trains a small random Llama (tests/helpers.py) with LoRA r=16 on the seven projections for
seven AdamW steps, bench_e2e.py's loop, as PEFT in bf16, fastqlora in bf16 and fastqlora in
fp32, and prints each step's loss minus the first:

    python benchmarks/lr_rounding_check.py --lr 1e-5
    python benchmarks/lr_rounding_check.py --lr 2e-4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def losses(model, ids: torch.Tensor, lr: float, steps: int = 7) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out_losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out_losses.append(float(out.loss.detach()))
    return out_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_hf_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fastqlora import FastLanguageModel

    ckpt = Path(tempfile.mkdtemp())
    write_hf_model(ckpt, "llama", dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    runs = {}
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    runs["peft bf16"] = losses(hf, ids, args.lr)
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(1)
        model, _ = FastLanguageModel.from_pretrained(str(ckpt), max_seq_length=64, dtype=dtype, load_in_4bit=False)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing=True)
        model.train()
        runs[f"fastqlora {str(dtype).split('.')[-1]}"] = losses(model, ids, args.lr)
    print(f"lr {args.lr:g}: each step's loss minus the first")
    for name, ls in runs.items():
        print(f"{name:16}", " ".join(f"{v - ls[0]:+.5f}" for v in ls[1:]))


if __name__ == "__main__":
    main()
