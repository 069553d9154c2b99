"""transformers' Trainer (or trl's SFTTrainer: ``--trainer trl``) driving a fastqlora model,
with and without ``FastLanguageModel.for_training(model, cuda_graph=True)`` (transformers'
Trainer: the loss forward and backward replayed from one CUDA graph per batch shape; trl: the
backbone's forward and backward from two, its fused LM head eager; the optimizer, clipping and
schedule eager in both).

Random token rows of a fixed length (the collator's padding gives every batch one shape, as
packing or a fixed max_length does), LoRA r=16 on the seven projections, checkpointing on,
bf16; tokens a second over the steps after ``--skip`` (warm-up and capture), each mode in
its own process.

    python benchmarks/bench_hf_trainer.py --shape llama-3.2-1b --batch 2 --seq 2048 --steps 12
    python benchmarks/bench_hf_trainer.py --trainer trl --shape llama-3.2-1b --out benchmarks/results/trl.json
    python benchmarks/bench_hf_trainer.py --ckpt path/to/model --device cpu --seq 48 --steps 3   # smoke run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import eager_graph  # noqa: E402


def run_mode(ckpt: str, mode: str, device: str, batch: int, seq: int, steps: int, skip: int,
             trainer: str = "transformers") -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fastqlora import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(ckpt, load_in_4bit=True, device=device)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=True)
    FastLanguageModel.for_training(model, cuda_graph=mode == "graph")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, vocab, (seq,), generator=g)), "labels": ids.clone()}
            for _ in range(batch * steps)]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                      report_to=[], logging_steps=1, save_strategy="no", use_cpu=device == "cpu",
                      bf16=device == "cuda", max_grad_norm=1.0, dataloader_num_workers=0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if trainer == "trl":
            import datasets
            import trl

            from fastqlora.demo import data_dir

            # token rows already made (trl tokenizes nothing); the demo's tokenizer gives trl its pad id
            _, tok = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True,
                                                       device="cpu")
            ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in rows])
            cfg = trl.SFTConfig(max_length=seq, **common)
            trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                           callbacks=[Clock(), Losses()]).train()
        else:
            Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows,
                    callbacks=[Clock(), Losses()]).train()
    timed = times[skip:]
    res = {"mode": mode, "steps": len(times), "timed_steps": len(timed),
           "tokens_per_s": batch * seq * len(timed) / sum(timed) if timed else 0.0,
           "step_s_median": sorted(timed)[len(timed) // 2] if timed else 0.0, "losses": losses,
           "graphs": _graphs(model)}
    if device == "cuda":
        res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _graphs(model) -> int:
    """Shapes captured by the graphed loss path or the graphed backbone."""
    n = 0
    for path in (getattr(model, "_graphed_loss", None), getattr(model, "_graphed_backbone", None)):
        if path is not None:
            n += sum(getattr(e, "graph", None) is not None or getattr(e, "forward", None) is not None
                     for e in path.entries.values())
    return n


def main(argv: list[str] | None = None) -> dict:
    p = eager_graph.parser(__doc__.split("\n")[0], "hf_trainer.json")
    p.add_argument("--trainer", choices=("transformers", "trl"), default="transformers")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process, print JSON
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        raise SystemExit(f"--skip ({args.skip}) must be below --steps ({args.steps})")
    ckpt = eager_graph.checkpoint(args.ckpt, args.ckpt_root, args.shape)
    if args.one:
        res = run_mode(ckpt, args.one, args.device, args.batch, args.seq, args.steps, args.skip, args.trainer)
        print("RESULT " + json.dumps(res), flush=True)
        return res
    results = eager_graph.header(args.device, ckpt, trainer=args.trainer, batch=args.batch, seq=args.seq)
    for mode in eager_graph.modes(args.modes):
        cmd = [sys.executable, __file__, "--ckpt", ckpt, "--device", args.device, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--skip", str(args.skip), "--trainer", args.trainer,
               "--one", mode]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or "RESULT " not in run.stdout:
            # the exit code says what the stderr cannot when the process was killed (negative: by that signal)
            raise SystemExit(f"{mode} failed (exit code {run.returncode}):\n{run.stderr[-4000:]}")
        res = json.loads(run.stdout.split("RESULT ", 1)[1])
        eager_graph.add_run(results, res, f"graphs: {res['graphs']}")
    return eager_graph.finish(results, args.out)


if __name__ == "__main__":
    main()
