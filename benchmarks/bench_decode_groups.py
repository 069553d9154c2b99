"""The projections that read one x, in one launch: Llama-3-8B's q|k|v (4096 + 1024 + 1024 rows)
and gate|up (2 x 14336 rows), K = 4096, at a few rows of x.

For each group and M, graph-timed (``graph_us``: 20 calls in a CUDA graph, best of 5 replays):
- ``ours_one_launch``: ``frozen_matmul(x, [q, k, v])`` — the dispatch times its candidates for
  the group and, with the tensor-core decode, runs the weights in one launch
  (``nf4_decode_mma_many``); the result is checked against each weight's own product;
- ``ours_separate``: one ``frozen_matmul(x, [w])`` a weight (what the group cost before);
- ``bnb_separate``: bitsandbytes' ``matmul_4bit`` a weight (what transformers + PEFT run).
No LoRA. q|k|v's 12.6 MB stay in the H200's L2 between calls; gate|up's 58.7 MB do not (every
system reads them from HBM alike).

    python benchmarks/bench_decode_groups.py [--m 1,2,4,8,16] [--out results/decode_groups.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import graph_us, make_weight  # noqa: E402

GROUPS = [("q|k|v", (4096, 1024, 1024)), ("gate|up", (14336, 14336))]
K = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_groups.py needs a CUDA GPU")
    import bitsandbytes as bnb

    from fastqlora.ops import nf4_dispatch
    from fastqlora.ops.nf4_linear import frozen_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'group':8s} {'M':>3s} {'one launch':>11s} {'separate':>9s} {'bnb':>8s} {'bnb/one':>8s} "
          f"{'bnb/sep':>8s}  picked (one launch)")
    for name, ns in GROUPS:
        made = [make_weight(n, K, gen) for n in ns]
        ws = [m[0] for m in made]
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            before = set(nf4_dispatch.choices().items())
            ys = frozen_matmul(x, ws)  # the dispatch times the group's candidates
            picked = [v for k, v in nf4_dispatch.choices().items() if (k, v) not in before]
            for w, y in zip(ws, ys):  # one launch gives each weight's own product
                (want,) = frozen_matmul(x, [w])
                err = float((y.float() - want.float()).norm() / want.float().norm())
                if err > 1e-2:
                    raise RuntimeError(f"{name} M={M}: one launch disagrees with the weight's own product ({err:.2e})")
            t_one = graph_us(lambda: frozen_matmul(x, ws))
            t_sep = graph_us(lambda: [frozen_matmul(x, [w]) for w in ws])
            t_bnb = graph_us(lambda: [bnb.matmul_4bit(x, m[1].t(), quant_state=m[2]) for m in made])
            rows.append({"group": name, "N": list(ns), "K": K, "M": M, "ours_one_launch_us": t_one,
                         "ours_separate_us": t_sep, "bnb_separate_us": t_bnb, "picked": picked})
            print(f"{name:8s} {M:3d} {t_one:9.2f}us {t_sep:7.2f}us {t_bnb:6.2f}us {t_bnb / t_one:7.2f}x "
                  f"{t_bnb / t_sep:7.2f}x  {', '.join(picked) or 'cached'}", flush=True)
        del made, ws
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
