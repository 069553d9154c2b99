"""The Trainer's steps, eager against replayed from a CUDA graph (TrainConfig.cuda_graph).

bench_e2e.py times a bare loop on full random rows; this times what `fastqlora train` runs:
packed rows of examples of random lengths, the learning-rate schedule, clipping, the metrics
file. A graphed step pads every row to the longest row's width (packed rows are nearly full
anyway; with --unpacked each row is one example, and eager steps pad each batch to its own
longest row) and replays forward, backward, clipping and AdamW as one graph, so the host's launch cost leaves
the step. Tokens a second count the examples' tokens, not padding; the first steps (eager
warm-up and the capture) are left out of the timing.

    python benchmarks/bench_trainer.py --shape llama-3.2-1b --batch 2 --seq 2048 --steps 12
    python benchmarks/bench_trainer.py --shape llama-3.2-1b --accumulation 4   # four micro-batches a step
    python benchmarks/bench_trainer.py --shape llama-3.2-1b --unpacked   # one example a row (packing=false)
    python benchmarks/bench_trainer.py --ckpt path/to/model --device cpu --seq 64 --steps 4   # smoke run
"""
from __future__ import annotations

import gc
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import eager_graph  # noqa: E402


def examples(n_tokens: int, vocab: int, low: int, high: int, seed: int) -> list:
    """Random examples (lengths uniform in [low, high]) of ``n_tokens`` tokens in all, every
    token but the first of an example counted in the loss."""
    from fastqlora.train.data import Example

    rng = random.Random(seed)
    out, total = [], 0
    while total < n_tokens:
        ids = [rng.randrange(vocab) for _ in range(rng.randint(low, high))]
        out.append(Example(input_ids=ids, labels=[-100] + ids[1:]))
        total += len(ids)
    return out


def run_mode(ckpt: str, mode: str, device: str, batch: int, seq: int, steps: int, skip: int,
             low: int, high: int, accumulation: int = 1, dropout: float = 0.0, unpacked: bool = False) -> dict:
    import torch

    from fastqlora import FastLanguageModel
    from fastqlora.train import TrainConfig, Trainer
    from fastqlora.train.packing import pack_examples, unpacked_rows

    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(ckpt, load_in_4bit=True, device=device)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=dropout,
                                             use_gradient_checkpointing=True)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    exs = examples(batch * seq * steps * accumulation, vocab, low, min(high, seq), seed=0)
    rows = unpacked_rows(exs, seq) if unpacked else pack_examples(exs, seq, seed=0)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(model=ckpt, dataset="-", output_dir=out_dir, max_seq_length=seq, batch_size=batch,
                          max_steps=steps, cuda_graph=mode == "graph", plot=False, progress=False,
                          learning_rate=1e-4, gradient_accumulation_steps=accumulation, lora_dropout=dropout,
                          packing=not unpacked)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(model, None, cfg, rows=rows)
        history = trainer.train()
        graphed = trainer.graphed is not None and trainer.graphed.graph is not None
    timed = history[skip:]
    seconds = sum(r["seconds"] for r in timed)
    res = {"mode": mode, "load_s": load_s, "steps": len(history), "timed_steps": len(timed),
           "tokens_per_s": sum(r["tokens"] for r in timed) / seconds if seconds else 0.0,
           "step_s_median": sorted(r["seconds"] for r in timed)[len(timed) // 2] if timed else 0.0,
           "losses": [r["loss"] for r in history], "graph_replayed": graphed,
           "graph_width": trainer.graph_width, "step_mode": trainer.step_mode}
    if device == "cuda":
        res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> dict:
    p = eager_graph.parser(__doc__.split("\n")[0], "trainer.json")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches a step (gradient_accumulation_steps)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lengths", default="64-1024", help="examples' lengths, LOW-HIGH tokens")
    p.add_argument("--unpacked", action="store_true", help="one example a row (packing=false) instead of packed rows")
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        raise SystemExit(f"--skip ({args.skip}) must be below --steps ({args.steps})")
    low, high = (int(v) for v in args.lengths.split("-"))
    ckpt = eager_graph.checkpoint(args.ckpt, args.ckpt_root, args.shape)
    results = eager_graph.header(args.device, ckpt, batch=args.batch, seq=args.seq, lengths=args.lengths,
                                 accumulation=args.accumulation, lora_dropout=args.lora_dropout,
                                 unpacked=args.unpacked)
    for mode in eager_graph.modes(args.modes):
        res = run_mode(ckpt, mode, args.device, args.batch, args.seq, args.steps, args.skip, low, high,
                       args.accumulation, args.lora_dropout, args.unpacked)
        eager_graph.add_run(results, res, f"graph replayed: {res['graph_replayed']}")
    return eager_graph.finish(results, args.out)


if __name__ == "__main__":
    main()
