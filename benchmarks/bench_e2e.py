"""End-to-end QLoRA training benchmark: fastqlora against transformers + PEFT + bitsandbytes.

The baseline is the canonical QLoRA recipe (DESIGN.md): NF4 + double quantization,
bf16 compute, SDPA attention, ``prepare_model_for_kbit_training`` with non-reentrant
gradient checkpointing, LoRA r=16 alpha=16 on the seven projections, torch AdamW.
Both systems train the same random-weight checkpoint of a real model's shape on the
same random tokens; each (system, shape, batch) runs in its own process so peak
memory is its own. Reported: load time, step time, tokens/s, peak GPU memory, and the
ratios ours/baseline.

Systems (--systems, comma list): ``baseline``; ``ours`` (the default: Triton kernels,
dequantize + cuBLAS projections); ``ours-ref`` (our model with the plain-torch
reference ops: the "before kernels" row); ``ours-fused`` (the opt-in fused NF4 LoRA
ops, FASTQLORA_NF4_FUSED=1); ``ours-grouped`` (FASTQLORA_GROUPED_LORA=1); ``ours-graph``
(the whole step captured as a CUDA graph and replayed: fastqlora.train.step_graph, AdamW with
capturable=True; the capture is the second warm-up step). Each runs in its own process with
its environment set.

    python benchmarks/bench_e2e.py --shapes llama-3-8b:2x2048,llama-3-8b:1x2048 \
        --shapes llama-3.2-1b:2x2048,llama-3.2-1b:8x2048 --out results/e2e.json
    python benchmarks/bench_e2e.py --shapes qwen2.5-7b:2x2048,qwen3-8b:2x2048,gemma-2-9b:1x2048,gemma-3-4b-text:2x2048

Shapes are random_checkpoint.py's (Llama 3/3.2, Qwen 2.5 and 3, Gemma 2 and 3's text model,
Phi-3.5-mini, Granite 3.1 8B, OLMo 2 7B, SmolLM3 3B);
Gemma 2's baseline runs transformers' eager attention (its SDPA path drops the soft-cap).

Floor (8B, 2×2048): 6·N_active·T FLOPs for a full backward would be 6·8e9·4096 ≈ 2.0e14;
with a frozen base the weight-gradient matmuls are skipped (≈ 4·N·T) plus recompute of
the forward under checkpointing (≈ +2·N·T) ≈ 2.0e14 FLOPs + attention; at ~790 TFLOP/s
that is ≈ 0.25 s/step ≈ 16k tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the environment each of our variants runs under (its own process)
OURS_ENV = {"ours": {}, "ours-ref": {"FASTQLORA_BACKEND": "reference"}, "ours-fused": {"FASTQLORA_NF4_FUSED": "1"},
            "ours-grouped": {"FASTQLORA_GROUPED_LORA": "1"}, "ours-graph": {}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak() -> dict[str, float]:
    import torch

    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _time_steps(step_fn, warmup: int, steps: int) -> list[float]:
    import torch

    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def hf_4bit_model(ckpt: str):
    """The baseline's model: transformers + bitsandbytes NF4 with double quantization, bf16
    compute, SDPA attention, on GPU 0."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    # Gemma 2's soft-capped attention is eager in transformers (its SDPA path has no soft-cap)
    family = json.loads((Path(ckpt) / "config.json").read_text()).get("model_type")
    attn = "eager" if family == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=torch.bfloat16,
                                                attn_implementation=attn, device_map={"": 0})


def run_baseline(ckpt: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    t0 = time.perf_counter()
    model = hf_4bit_model(ckpt)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return _train(model, opt, batch, seq, warmup, steps, load_s)


def run_ours(ckpt: str, batch: int, seq: int, warmup: int, steps: int, checkpointing: str,
             graph: bool = False) -> dict:
    import torch

    from fastqlora import FastLanguageModel

    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    mode = {"true": True, "false": False}.get(checkpointing, checkpointing)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing=mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, capturable=graph)
    return _train(model, opt, batch, seq, warmup, steps, load_s, graph=graph)


def _train(model, opt, batch: int, seq: int, warmup: int, steps: int, load_s: float, graph: bool = False) -> dict:
    import torch

    model.train()  # as Trainer does: transformers checkpoints layers only in training mode
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
    losses = []

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))

    if graph:
        from fastqlora.train.step_graph import GraphedTrainStep

        if warmup < 2:
            raise SystemExit("ours-graph needs --warmup 2 or more (an eager step, then the capture)")
        graphed = GraphedTrainStep(model, opt, warmup=1)

        def step():  # noqa: F811  (the graphed step replaces the eager one)
            losses.append(float(graphed(input_ids=ids, labels=ids)))

    torch.cuda.reset_peak_memory_stats()
    times = _time_steps(step, warmup, steps)
    med = sorted(times)[len(times) // 2]
    return {"load_s": load_s, "step_s": med, "tokens_per_s": batch * seq / med, "losses": losses,
            "step_times": times, **_peak()}


def child(args: argparse.Namespace) -> None:
    if args.system == "baseline":
        res = run_baseline(args.ckpt, args.batch, args.seq, args.warmup, args.steps)
    else:
        res = run_ours(args.ckpt, args.batch, args.seq, args.warmup, args.steps, args.checkpointing,
                       graph=args.system == "ours-graph")
    print("RESULT " + json.dumps(res), flush=True)


def spawn(system: str, ckpt: str, batch: int, seq: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--ckpt", ckpt, "--batch", str(batch),
           "--seq", str(seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--checkpointing", args.checkpointing]
    t0 = time.perf_counter()
    if system != "baseline" and system not in OURS_ENV:
        raise SystemExit(f"unknown system {system!r}: choose from baseline, {', '.join(OURS_ENV)}")
    env = {**os.environ, **OURS_ENV.get(system, {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stdout + proc.stderr)[-3000:]
    oom = "OutOfMemoryError" in tail or "out of memory" in tail
    print(f"[{system} b{batch} s{seq}] failed (rc {proc.returncode}){' OOM' if oom else ''}:\n{tail}", flush=True)
    return {"error": "oom" if oom else f"rc {proc.returncode}", "log_tail": tail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", action="append", default=None,
                   help="comma list of shape:BATCHxSEQ (default: the DESIGN.md set)")
    p.add_argument("--systems", default="baseline,ours")
    p.add_argument("--ckpt-root", default="/tmp/fq-ckpts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", default="true", help="ours: true / offload / false")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default=str(HERE / "results" / "e2e.json"))
    p.add_argument("--child", action="store_true")
    p.add_argument("--system")
    p.add_argument("--ckpt")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    sys.path.insert(0, str(HERE))
    from random_checkpoint import write_random_checkpoint

    specs = ",".join(args.shapes or ["llama-3-8b:2x2048,llama-3-8b:1x2048,llama-3.2-1b:2x2048,llama-3.2-1b:8x2048"])
    runs = []
    for spec in specs.split(","):
        shape, bs = spec.split(":")
        b, s = (int(v) for v in bs.split("x"))
        runs.append((shape, b, s))
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "runs": []}
    for shape in dict.fromkeys(r[0] for r in runs):
        ckpt = os.path.join(args.ckpt_root, shape)
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            t0 = time.perf_counter()
            write_random_checkpoint(ckpt, shape=shape)
            print(f"wrote {shape} checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        for (_, b, s) in [r for r in runs if r[0] == shape]:
            row = {"shape": shape, "batch": b, "seq": s}
            for system in args.systems.split(","):
                row[system] = spawn(system, ckpt, b, s, args)
                print(f"{shape} {b}x{s} {system}: {json.dumps({k: v for k, v in row[system].items() if k not in ('losses', 'step_times', 'log_tail')})}", flush=True)
            results["runs"].append(row)
            # written after every row, so a run cut short by a time limit keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, {results['date']}")
    hdr = f"{'shape':14} {'batch':>8} | {'base tok/s':>10} {'base GiB':>8} | {'ours tok/s':>10} {'ours GiB':>8} | {'speed':>6} {'mem':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["runs"]:
        b, o = r.get("baseline", {}), r.get("ours", {})

        def f(d, k, fmt):
            return format(d[k], fmt) if k in d else d.get("error", "-")

        speed = f"{o['tokens_per_s'] / b['tokens_per_s']:.2f}x" if "tokens_per_s" in b and "tokens_per_s" in o else "-"
        mem = f"{o['peak_alloc_gib'] / b['peak_alloc_gib']:.2f}x" if "peak_alloc_gib" in b and "peak_alloc_gib" in o else "-"
        print(f"{r['shape']:14} {r['batch']}x{r['seq']:<6} | {f(b, 'tokens_per_s', '10,.0f'):>10} "
              f"{f(b, 'peak_alloc_gib', '8.1f'):>8} | {f(o, 'tokens_per_s', '10,.0f'):>10} "
              f"{f(o, 'peak_alloc_gib', '8.1f'):>8} | {speed:>6} {mem:>6}")
        for name in [k for k in OURS_ENV if k != "ours" and k in r]:
            v = r[name]
            ratio = (f"{v['tokens_per_s'] / b['tokens_per_s']:.2f}x vs baseline" if "tokens_per_s" in v
                     and "tokens_per_s" in b else "")
            print(f"{'':14} {name:>8} | {f(v, 'tokens_per_s', '10,.0f'):>10} tok/s "
                  f"{f(v, 'peak_alloc_gib', '8.1f'):>8} GiB {ratio}")


if __name__ == "__main__":
    main()
