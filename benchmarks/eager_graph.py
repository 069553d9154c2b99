"""What the eager-against-graph benchmarks share (bench_trainer.py, bench_hf_trainer.py): the
checkpoint to run (a folder, or a random one of a real model's shape written once), the
result's header, and the graph / eager ratio printed and written with the runs."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def checkpoint(ckpt: str | None, root: str, shape: str) -> str:
    """``ckpt``, or a random-weight checkpoint of ``shape`` under ``root`` (written if absent)."""
    if ckpt is not None:
        return ckpt
    path = os.path.join(root, shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        sys.path.insert(0, str(HERE))
        from random_checkpoint import write_random_checkpoint

        write_random_checkpoint(path, shape=shape)
    return path


def header(device: str, ckpt: str, **fields) -> dict:
    import torch

    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "torch": torch.__version__,
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "ckpt": ckpt, **fields, "runs": []}


def finish(results: dict, out: str) -> dict:
    """Add and print graph / eager (when both ran), write the JSON."""
    by = {r["mode"]: r for r in results["runs"]}
    if "eager" in by and "graph" in by and by["eager"]["tokens_per_s"]:
        results["graph_speedup"] = by["graph"]["tokens_per_s"] / by["eager"]["tokens_per_s"]
        print(f"graph / eager: {results['graph_speedup']:.2f}x", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    return results


def modes(spec: str) -> list[str]:
    """``--modes``: eager, graph or both, in the order given."""
    out = spec.split(",")
    for mode in out:
        if mode not in ("eager", "graph"):
            raise SystemExit(f"unknown mode {mode!r}: choose eager, graph")
    return out


def add_run(results: dict, res: dict, note: str) -> None:
    """Keep one mode's result and print its line (``note``: what says the graph ran)."""
    results["runs"].append(res)
    mem = f", {res['peak_alloc_gib']:.2f} GiB" if "peak_alloc_gib" in res else ""
    print(f"{res['mode']:6} {res['tokens_per_s']:10,.0f} tok/s, median step {res['step_s_median'] * 1e3:.1f} ms"
          f"{mem}, {note}", flush=True)


def parser(description: str, out: str):
    """The options both benchmarks take; each adds its own."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", default="llama-3.2-1b", help="random_checkpoint.py's shape (when no --ckpt)")
    p.add_argument("--ckpt", help="a model folder (default: a random checkpoint of --shape under --ckpt-root)")
    p.add_argument("--ckpt-root", default="/tmp/fq-ckpts")
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (warm-up, capture)")
    p.add_argument("--out", default=str(HERE / "results" / out))
    return p
