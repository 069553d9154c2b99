"""Where generation's decode step spends its time: one generate() of ours under the torch
profiler, each kernel of the replayed CUDA graph counted (CUPTI sees the graph's nodes).

Prints and writes: the wall time of a 1-token and an N-token generate (the difference over N−1
is the decode time a token, here slowed by the profiler's presence only in the profiled run),
the kernels launched and their device time in the profiled run (the prefill included), and the
kernel names that took most of it (name, total ms, count).

    python benchmarks/random_checkpoint.py --shape llama-3-8b --out /tmp/fq-ckpts/llama-3-8b
    python benchmarks/profile_decode.py --ckpt /tmp/fq-ckpts/llama-3-8b --out profile_decode.json

``--device cpu`` (what CI has) counts the aten ops the CPU ran instead of kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint directory (benchmarks/random_checkpoint.py writes one)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=33)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="profile_decode.json")
    p.add_argument("--device", default=None, help="cuda (the default where there is one) or cpu")
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be at least 2 (one prefill token and decode steps)")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_generate import load_ours

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    model, gen = load_ours(args.ckpt, args.prompt + args.new, device=str(device))
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        gen(ids, n)
        sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        gen(ids, 9)  # warm-up: kernels compiled, the dispatch timed, a graph captured
        wall_n, wall_1 = timed(args.new), timed(1)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU] if cuda
                     else [ProfilerActivity.CPU]) as prof:
            gen(ids, args.new)
            sync()
    if cuda:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        times = [e.device_time / 1e3 for e in events]
    else:  # the aten ops, each by the time it spent itself
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        times = [e.self_cpu_time_total / 1e3 for e in events]
    by: dict[str, list] = {}
    for e, ms in zip(events, times):
        entry = by.setdefault(e.name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += ms
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:args.top]
    res = {"ckpt": args.ckpt, "batch": args.batch, "prompt": args.prompt, "new": args.new,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "wall_ms_new": wall_n * 1e3,
           "wall_ms_1": wall_1 * 1e3, "decode_wall_ms_per_token": (wall_n - wall_1) * 1e3 / (args.new - 1),
           "kernels": len(events), "kernel_ms": sum(times),
           "top": [[name, ms, count] for name, (count, ms) in top]}
    print(json.dumps({k: v for k, v in res.items() if k != "top"}))
    for name, ms, count in res["top"]:
        print(f"{ms:9.2f} ms {count:6d}  {name}")
    Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
