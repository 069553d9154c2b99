"""What the NF4 dispatch picks at one row, and what a captured decode step pays for it.

For each Llama-3-8B projection shape and each M of ``--m`` (default 1): ``frozen_matmul`` with a rank-16 LoRA term
(its first call times every candidate and checks it against dequantize + cuBLAS), its
GPU-only time in a CUDA graph (``bench_nf4_matmul.graph_us``) against bitsandbytes'
``matmul_4bit`` without LoRA, its relative error against bitsandbytes' dequantize + an
fp32 matmul, and then the configuration chosen per shape.

    python benchmarks/decode_dispatch.py [--m 1,4,16] [--out results/decode_dispatch.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import SHAPES, graph_us, make_weight  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--m", default="1", help="rows of x, comma-separated")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_dispatch.py needs a CUDA GPU")
    import bitsandbytes as bnb

    from fastqlora.ops import nf4_dispatch
    from fastqlora.ops.nf4_linear import frozen_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, N, K in SHAPES:
        w, packed, qs, wd = make_weight(N, K, gen)
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            a = torch.randn(16, K, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
            b = torch.randn(N, 16, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
            xa = x @ a.t()
            (y,) = frozen_matmul(x, [w], xa=xa, lora_b=[b], scales=[2.0])
            ref = x.float() @ wd.float().t() + 2.0 * (xa.float() @ b.float().t())
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t = graph_us(lambda: frozen_matmul(x, [w], xa=xa, lora_b=[b], scales=[2.0]))
            tb = graph_us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs))
            rows.append({"shape": name, "N": N, "K": K, "M": M, "dispatch_lora_us": t, "bnb_us": tb, "rel_err": err})
            print(f"{name} M={M}: dispatch+LoRA graph {t:.1f} us, bnb (no LoRA) {tb:.1f} us ({tb / t:.2f}x), "
                  f"err {err:.1e}", flush=True)
    picked = {" ".join(str(p) for p in k[4:8]): v for k, v in nf4_dispatch.choices().items()}
    for k, v in picked.items():
        print(k, v)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows, "picked": picked}, f, indent=1)


if __name__ == "__main__":
    main()
