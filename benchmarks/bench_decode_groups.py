"""The projections that read one x, in one launch: Llama-3-8B's q|k|v (4096 + 1024 + 1024 rows)
and gate|up (2 x 14336 rows), K = 4096, at a few rows of x.

For each group and M, graph-timed (``graph_us``: 20 calls in a CUDA graph, best of 5 replays):
- ``ours_one_launch``: ``frozen_matmul(x, [q, k, v])`` — the dispatch times its candidates for
  the group and, with the tensor-core decode, runs the weights in one launch
  (``nf4_decode_mma_many``); the result is checked against each weight's own product;
- ``ours_separate``: one ``frozen_matmul(x, [w])`` a weight (what the group cost before);
- ``bnb_separate``: bitsandbytes' ``matmul_4bit`` a weight (what transformers + PEFT run).
No LoRA. q|k|v's 12.6 MB stay in the H200's L2 between calls; gate|up's 58.7 MB do not (every
system reads them from HBM alike). ``--hbm``: each call reads its own copy of the group's weights
(``cycle_us``: enough copies to fill 4x the L2), so every system reads them from HBM, as in a
model's decode step.

    python benchmarks/bench_decode_groups.py [--m 1,2,4,8,16] [--hbm] [--out results/decode_groups.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import cycle_us, graph_us, l2_copies, make_weight  # noqa: E402

GROUPS = [("q|k|v", (4096, 1024, 1024)), ("gate|up", (14336, 14336))]
K = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--hbm", action="store_true", help="each call reads its own copy of the weights (see above)")
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
        n_copies = l2_copies(sum(ns) * K // 2) if args.hbm else 1
        copies = [[make_weight(n, K, gen)[:3] for n in ns] for _ in range(n_copies)]  # [copy][weight]
        made = copies[0]
        ws = [m[0] for m in made]

        def timed(call) -> float:  # call(made) -> one product of that copy's weights
            return cycle_us([lambda c=c: call(c) for c in copies]) if args.hbm else graph_us(lambda: call(made))
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
            t_one = timed(lambda c: frozen_matmul(x, [m[0] for m in c]))
            t_sep = timed(lambda c: [frozen_matmul(x, [m[0]]) for m in c])
            t_bnb = timed(lambda c: [bnb.matmul_4bit(x, m[1].t(), quant_state=m[2]) for m in c])
            rows.append({"group": name, "N": list(ns), "K": K, "M": M, "copies": n_copies, "ours_one_launch_us": t_one,
                         "ours_separate_us": t_sep, "bnb_separate_us": t_bnb, "picked": picked})
            print(f"{name:8s} {M:3d} {t_one:9.2f}us {t_sep:7.2f}us {t_bnb:6.2f}us {t_bnb / t_one:7.2f}x "
                  f"{t_bnb / t_sep:7.2f}x  {', '.join(picked) or 'cached'}", flush=True)
        del copies, made, ws
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "hbm": args.hbm,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
