"""Where one QLoRA training step of fastqlora spends its time, kernel by kernel, grouped.

Loads a checkpoint (a folder, or a real model's shape from random_checkpoint.py written under
``--ckpt-root``) in 4-bit with LoRA r=16 on the seven projections, as ``bench_e2e.py``'s ``ours``
does, runs warm-up steps on random tokens, then profiles ``--steps`` steps with torch's profiler
and sums each kernel's device time (self time of each op on the CPU) into groups: the NF4
dequantize, matmuls, attention, the RMSNorm / RoPE / activation / cross-entropy kernels,
the fused NF4 matmuls, copies and the rest. Prints the groups and the heaviest kernels as a share
of the step, and writes them as JSON: the first thing to look at before tuning a family.

    python benchmarks/profile_step.py --shape smollm3-3b --batch 2 --seq 2048 --out prof.json
    python benchmarks/profile_step.py --ckpt path/to/model --device cpu --seq 64   # CPU: op times
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (group, pattern on the kernel or op name), first match wins; names are lower-cased
GROUPS = [
    ("attention", r"_attn_(fwd|bwd)|scaled_dot_product|flash_attention"),
    ("NF4 dequantize", r"nf4_dequant|dequantize"),
    ("NF4 fused matmul", r"nf4_(matmul|gemv|decode)|k_nf4"),
    ("cross-entropy", r"cross_entropy|_ce_|logsumexp"),
    ("RMSNorm", r"rms_norm|rmsnorm"),
    ("RoPE", r"rope"),
    ("activation", r"swiglu|geglu|_gated|silu|gelu"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("copies and casts", r"copy|memcpy|memset|aten::(to|_to_copy|copy_|fill_|zero_|clone|contiguous|cat)$"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def summarize(events: list[tuple[str, float]], steps: int) -> dict:
    """Per-step ms of each group and of the heaviest kernels, from (name, total µs) pairs."""
    by_group: dict[str, float] = {}
    for name, us in events:
        group = group_of(name)
        by_group[group] = by_group.get(group, 0.0) + us / steps / 1e3
    total = sum(by_group.values())
    top = sorted(((us / steps / 1e3, name) for name, us in events), reverse=True)[:15]
    return {"total_ms": total,
            "groups": {g: {"ms": ms, "share": ms / total if total else 0.0}
                       for g, ms in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n, "group": group_of(n), "ms": ms} for ms, n in top]}


def host_profile(step, sync, path: str, top: int = 40) -> str:
    """One step under cProfile; its heaviest functions (own time, then with callees) to ``path``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step()
    sync()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(buf.getvalue())
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3-8b", help="random_checkpoint.py's shape (ignored with --ckpt)")
    p.add_argument("--ckpt", default=None, help="a checkpoint folder instead of a random one")
    p.add_argument("--ckpt-root", default="/tmp/fq-ckpts")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--host", default=None, metavar="FILE",
                   help="also run one step under cProfile and write its heaviest Python functions to FILE "
                        "(when the step's wall time exceeds its device time, the host is what to tune)")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastqlora import FastLanguageModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = args.ckpt
    if ckpt is None:
        sys.path.insert(0, str(HERE))
        from random_checkpoint import write_random_checkpoint

        ckpt = os.path.join(args.ckpt_root, args.shape)
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            write_random_checkpoint(ckpt, shape=args.shape, device=device)
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=args.seq, dtype=dtype, load_in_4bit=True,
                                                 device=device)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing=True)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device, generator=g)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = []
    counts = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
        if us > 0:
            events.append((e.key, float(us)))
            counts.append((e.count / args.steps, e.key))
    launches = sum(c for c, _ in counts) * args.steps
    res = {"checkpoint": ckpt, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "batch": args.batch,
           "seq": args.seq, "wall_ms_per_step": wall_ms, "kernels_per_step": launches / args.steps,
           **summarize(events, args.steps),
           "most_launched": [{"name": n, "group": group_of(n), "per_step": c}
                             for c, n in sorted(counts, reverse=True)[:25]]}
    if args.host:
        res["host_profile"] = host_profile(step, sync, args.host)
    unit = "device" if cuda else "CPU self"
    print(f"{ckpt}, {args.batch} x {args.seq} on {res['device']}: {wall_ms:.1f} ms a step (wall, unprofiled); "
          f"{res['total_ms']:.1f} ms of {unit} time in {res['kernels_per_step']:.0f} "
          f"{'kernels' if cuda else 'ops'}")
    for grp, v in res["groups"].items():
        print(f"  {grp:18} {v['ms']:9.2f} ms  {100 * v['share']:5.1f}%")
    print("most launched (a step):")
    for t in res["most_launched"][:12]:
        print(f"  {t['per_step']:7.0f}  [{t['group']}] {t['name'][:90]}")
    print("heaviest:")
    for t in res["top"]:
        print(f"  {t['ms']:9.2f} ms  [{t['group']}] {t['name'][:90]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
