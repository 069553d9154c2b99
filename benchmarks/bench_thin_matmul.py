"""The thin LoRA product ``x·Aᵀ`` of a decode step (x [M, K], A [r, K], bf16), three ways, on
Llama-3-8B's shapes at rank 16 (A stacked as the decode step stacks it: q|k|v 48 rows, o 16,
gate|up 32, down 16 on K = 14336):

- ``split``: triton_kernels/thin_matmul.py's split-K kernel (tensor cores; the last program
  sums the partials);
- ``rows``: its kernel of a program a row of A (elementwise, no split);
- ``cuBLAS``: ``x @ A.t()``.

Each timed with ``graph_us`` (20 calls in a CUDA graph, best of 5 replays; A stays in L2, as
it does between a model's steps: the adapters of all layers are ~40 MB at rank 16), and a
launch that touches 16 elements, the floor of any kernel in the graph.

    python benchmarks/bench_thin_matmul.py [--m 1,2,4,8,16] [--out results/thin_matmul.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import graph_us  # noqa: E402

SHAPES = [("q|k|v", 4096, 48), ("o", 4096, 16), ("gate|up", 4096, 32), ("down", 14336, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_thin_matmul.py needs a CUDA GPU")
    from fastqlora.triton_kernels.thin_matmul import thin_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    tiny = torch.zeros(16, device="cuda")
    t_launch = graph_us(lambda: tiny.add_(1.0))
    print(f"launch (16 elements): {t_launch:.2f} us")
    rows = []
    for name, K, R in SHAPES:
        a = torch.randn(R, K, device="cuda", generator=gen).bfloat16() * 0.02
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
            want = x.double() @ a.double().t()
            row = {"shape": name, "K": K, "R": R, "M": M}
            for method in ("split", "rows"):
                got = thin_matmul(x, a, method=method)
                err = ((got.double() - want).norm() / want.norm()).item()
                if err > 1e-2:
                    raise RuntimeError(f"{name} M={M} {method}: relative error {err:.2e}")
                row[f"{method}_us"] = graph_us(lambda method=method: thin_matmul(x, a, method=method))
            row["cublas_us"] = graph_us(lambda: x @ a.t())
            rows.append(row)
            print(f"{name:8s} K={K:5d} r={R:2d} M={M:2d}: split {row['split_us']:5.2f} | rows {row['rows_us']:5.2f} "
                  f"| cuBLAS {row['cublas_us']:5.2f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "launch_us": t_launch,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
