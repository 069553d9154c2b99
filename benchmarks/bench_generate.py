"""Generation benchmark: fastqlora's KV-cache generation against transformers + PEFT + bitsandbytes.

Both systems load the same random-weight checkpoint of a real model's shape in NF4 (double
quantization, bf16 compute), attach LoRA r=16 on the seven projections (unmerged, as after
training), and generate greedily from the same random prompt without stopping early
(the baseline gets ``min_new_tokens``, ours no stop ids). Each system runs in its own process.

Reported per (system, shape, batch): the prefill time (a generate of one token), the decode
time per token ((t(N) - t(1)) / (N - 1), both medians of --repeats runs), decode tokens/s
(batch / per-token time), peak GPU memory, and ours/baseline ratios.

Systems: ``baseline``; ``ours`` (the default: the decode step replayed as a CUDA graph, its
few-row NF4 projections through the decode kernels); ``ours-eager`` (FASTQLORA_DECODE_GRAPH=0:
every kernel launched from Python, projections by dequantize + cuBLAS); ``ours-graph-dequant``
(FASTQLORA_DECODE_KERNELS=0: the graph, projections by dequantize + cuBLAS);
``ours-eager-decode`` (eager steps through the decode kernels); ``ours-torch-attn`` and
``ours-eager-torch-attn`` (FASTQLORA_DECODE_ATTENTION=0: the step's attention as torch ops,
graphed or eager, instead of the split decode-attention kernels); ``ours-separate-launch``
(FASTQLORA_DECODE_SHARED_LAUNCH=0: q, k, v and gate, up in one tensor-core decode launch a
weight instead of one launch a group); ``ours-thin-split`` (FASTQLORA_THIN_ROWS=0: the thin
LoRA product x·Aᵀ split over K at one and two rows too). A system named twice in
``--systems`` runs twice in that order (rounds alternated against drift), kept as "name #2".

    python benchmarks/bench_generate.py --shapes llama-3-8b:1,llama-3.2-1b:1 --prompt 128 --new 128

Floor (one token, batch 1, Llama-3-8B): each projection weight read once, 4 bits + the
double-quantized absmax ≈ 0.52 byte x 7.0e9 ≈ 3.6 GB, plus the bf16 LM head (128256 x 4096 x
2 B ≈ 1.05 GB): ≈ 4.7 GB at the H200's ~4 TB/s measured copy rate ≈ 1.2 ms a token (~850 tokens/s).
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
sys.path.insert(0, str(HERE))
from bench_e2e import TARGETS, hf_4bit_model  # noqa: E402  (the baseline's model, as training loads it)

OURS_ENV = {"ours": {}, "ours-eager": {"FASTQLORA_DECODE_GRAPH": "0"},
            "ours-graph-dequant": {"FASTQLORA_DECODE_KERNELS": "0"},
            "ours-eager-decode": {"FASTQLORA_DECODE_GRAPH": "0", "FASTQLORA_DECODE_KERNELS": "1"},
            "ours-torch-attn": {"FASTQLORA_DECODE_ATTENTION": "0"},
            "ours-separate-launch": {"FASTQLORA_DECODE_SHARED_LAUNCH": "0"},
            "ours-thin-split": {"FASTQLORA_THIN_ROWS": "0"},
            "ours-eager-torch-attn": {"FASTQLORA_DECODE_GRAPH": "0", "FASTQLORA_DECODE_ATTENTION": "0"}}


def load_baseline(ckpt: str):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_4bit_model(ckpt), LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                           target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.eval()

    def gen(ids, n):
        return model.generate(input_ids=ids, attention_mask=None, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0)

    return model, gen


def load_ours(ckpt: str, capacity: int, device: str | None = None):
    import torch

    from fastqlora import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=capacity, load_in_4bit=True, device=device,
                                                 dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing=False)
    model.eval()

    def gen(ids, n):
        return model.generate(ids, max_new_tokens=n, eos_token_id=[], pad_token_id=0)

    return model, gen


def _median_time(fn, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def child(args: argparse.Namespace) -> dict:
    import torch

    model, gen = (load_baseline(args.ckpt) if args.system == "baseline"
                  else load_ours(args.ckpt, args.prompt + args.new))
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(1, vocab, (args.batch, args.prompt), device="cuda", generator=g)
    with torch.no_grad():
        out = gen(ids, args.new)  # warm-up: kernels compiled, dispatch timed, graphs captured
        if out.shape != (args.batch, args.prompt + args.new):
            raise RuntimeError(f"generated {tuple(out.shape)}, expected {(args.batch, args.prompt + args.new)}")
        torch.cuda.reset_peak_memory_stats()
        t1 = _median_time(lambda: gen(ids, 1), args.repeats)
        tn = _median_time(lambda: gen(ids, args.new), args.repeats)
        tokens = gen(ids, args.new)[:, args.prompt:].tolist()
    per_token = (tn - t1) / (args.new - 1)
    return {"prefill_s": t1, "total_s": tn, "decode_ms_per_token": per_token * 1e3,
            "decode_tokens_per_s": args.batch / per_token, "first_tokens": tokens[0][:8],
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30}


def spawn(system: str, ckpt: str, batch: int, args: argparse.Namespace) -> dict:
    if system != "baseline" and system not in OURS_ENV:
        raise SystemExit(f"unknown system {system!r}: choose from baseline, {', '.join(OURS_ENV)}")
    cmd = [sys.executable, __file__, "--child", "--system", system, "--ckpt", ckpt, "--batch", str(batch),
           "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats)]
    env = {**os.environ, **OURS_ENV.get(system, {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(f"[{system} b{batch}] failed (rc {proc.returncode}):\n{tail}", flush=True)
    return {"error": f"rc {proc.returncode}", "log_tail": tail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama-3-8b:1", help="comma list of shape:BATCH")
    p.add_argument("--systems", default="baseline,ours")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ckpt-root", default="/tmp/fq-ckpts")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(HERE / "results" / "generate.json"))
    p.add_argument("--child", action="store_true")
    p.add_argument("--system")
    p.add_argument("--ckpt")
    p.add_argument("--batch", type=int)
    args = p.parse_args()
    if args.new < 2:
        raise SystemExit("--new must be at least 2 (the per-token time is (t(N) - t(1)) / (N - 1))")
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import torch

    from random_checkpoint import write_random_checkpoint

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%d"), "prompt": args.prompt, "new": args.new, "runs": []}
    for spec in args.shapes.split(","):
        shape, batch = spec.split(":")
        ckpt = os.path.join(args.ckpt_root, shape)
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            write_random_checkpoint(ckpt, shape=shape)
        row = {"shape": shape, "batch": int(batch)}
        for system in args.systems.split(","):
            # a system named twice (rounds alternated against drift) is kept as "name #2", ...
            key = system if system not in row else f"{system} #{sum(k.split(' #')[0] == system for k in row) + 1}"
            row[key] = spawn(system, ckpt, int(batch), args)
            r = row[key]
            if "error" not in r:
                print(f"{shape} b{batch} {key}: prefill {r['prefill_s'] * 1e3:.1f} ms, decode "
                      f"{r['decode_ms_per_token']:.2f} ms/token ({r['decode_tokens_per_s']:.1f} tok/s), "
                      f"peak {r['peak_alloc_gib']:.1f} GiB, tokens {r['first_tokens']}", flush=True)
        base = row.get("baseline", {})
        if "decode_ms_per_token" in base:
            for system in args.systems.split(","):
                r = row[system]
                if system != "baseline" and "decode_ms_per_token" in r:
                    r["decode_speedup"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
                    r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
                    print(f"  {system}: decode {r['decode_speedup']:.2f}x, prefill {r['prefill_speedup']:.2f}x "
                          f"the baseline", flush=True)
        results["runs"].append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
