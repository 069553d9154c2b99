"""Decode-shape sweep of the fused NF4 product: every tile × split-K, GPU time only.

At M = 1 and 16 the host's launch cost is as long as the kernel, so each candidate is timed
by replaying N calls captured in a CUDA graph (``bench_nf4_matmul.graph_us``), against
bitsandbytes' ``matmul_4bit`` timed the same way, on Llama-3-8B's projection shapes. Each
candidate's result is checked against bitsandbytes' dequantize + an fp32 matmul (rows with
relative error ≥ 1e-2 are printed as BAD). At M = 1 the Triton gemv and the extension's CUDA
gemv (``cuda gemv r<rows a warp> w<warps> [sk<warps K is split over>]``) join the tiles, at
M = 2 the CUDA gemv's two-row kernels; at
M ≤ 16 the extension's tensor-core decode (``cuda mma s<warps K is split over> [kb<blocks of
the grid K is split over>] [cols]``, the column layout at M <= 2, ``cuda mma g<row groups a
16-warp block> cols`` and ``... cols r8``, 8 weight rows a warp). ``--table`` times the
dispatch's tables instead of the whole grid. The decode table in ``triton_kernels/nf4_configs.py``
is this sweep's fastest tiles.

``--hbm``: each graph-captured call reads its own copy of the weight (``cycle_us``: enough copies
to fill 4x the L2), as a model's decode step reads its weights from HBM; the dispatch times its
candidates on one weight, which at these sizes stays in the L2.

    python benchmarks/sweep_nf4_decode.py --out benchmarks/results/nf4_decode_split_sweep_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import SHAPES, cycle_us, graph_us, l2_copies, make_weight  # noqa: E402

TILES = [(16, 256, 4), (32, 256, 4), (64, 256, 4), (32, 512, 4), (64, 128, 4), (32, 128, 4), (64, 256, 8)]
# the weight tile as the MMA's A operand (Yᵀ = W·Xᵀ): the decoded weights feed the tensor
# cores from registers, with no store to shared memory; N = 64 or 128 weight rows a tile
WA_TILES = [(64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_decode_split_sweep.json"))
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of q/o k/v gate/up down")
    ap.add_argument("--m", default="1,16", help="rows to sweep")
    ap.add_argument("--wa-only", action="store_true", help="only the weight-as-A tiles")
    ap.add_argument("--gemv-only", action="store_true", help="only the gemv kernels (Triton at M = 1, CUDA at M <= 2)")
    ap.add_argument("--table", action="store_true", help="the dispatch's tables (nf4_configs) and the mma grid only")
    ap.add_argument("--hbm", action="store_true", help="each call reads its own copy of the weight (see above)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_nf4_decode.py needs a CUDA GPU")
    import bitsandbytes as bnb

    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma
    from fastqlora.ops.nf4_gemv_cuda import nf4_gemv_cuda
    from fastqlora.triton_kernels import nf4_configs
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig as D
    from fastqlora.triton_kernels.nf4_configs import GemvConfig as G
    from fastqlora.triton_kernels.nf4_configs import MatmulConfig as C
    from fastqlora.triton_kernels.nf4_gemv import nf4_gemv
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd

    grid = [] if args.wa_only or args.gemv_only else [C(16, bn, bk, 1, sk, False, w, 3) for bn, bk, w in TILES for sk in (1, 2, 4, 8)]
    if not args.gemv_only:
        grid += [C(16, bn, bk, 1, sk, True, w, 3) for bn, bk, w in WA_TILES for sk in (1, 2, 4, 8)]
    gemv = [G(64, sk, 2) for sk in (4, 8, 16, 32)] + [G(128, sk, 4) for sk in (8, 16)] + [G(256, sk, 8) for sk in (16, 32)]
    # the extension's CUDA gemv (csrc/nf4_gemv.cu): weight rows a warp x warps a block
    gemv += [G(r, 1, wp, cuda=True) for r in (1, 2, 4, 8) for wp in (4, 8)]
    gemv += [G(r, sk, wp, cuda=True) for r in (2, 4, 8) for sk in (2, 4) for wp in (4, 8)]
    # at two rows of x: the CUDA gemv without one weight row a warp
    gemv2 = [c for c in gemv if c.cuda and c.bn > 1]
    mma = [] if args.wa_only or args.gemv_only else [D(s, kb) for s in (2, 4, 8) for kb in (1, 2, 4, 8, 16)]
    # the column layout (M <= 2)
    mma_cols = [] if args.wa_only or args.gemv_only else [D(s, kb, cols=True) for s in (2, 4, 8) for kb in (1, 2, 4, 8)]
    # ... and its 16-warp blocks of G row groups
    mma_cols += [] if args.wa_only or args.gemv_only else [D(0, cols=True, groups=g) for g in (1, 2, 3, 4, 7, 8)]
    # ... and with 8 weight rows a warp
    mma_cols += [] if args.wa_only or args.gemv_only else [D(s, 1, cols=True, rows=8) for s in (2, 4, 8)]
    cap = torch.cuda.get_device_capability()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {"device": torch.cuda.get_device_name(0), "command": " ".join(sys.argv), "hbm": args.hbm}
    for name, N, K in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        w, packed, qs, wd = make_weight(N, K, gen)
        # [(ours, packed, quant state)] a copy: the first is the checked weight's
        copies = [(w, packed, qs)] + [make_weight(N, K, gen)[:3] for _ in range(l2_copies(N * K // 2) - 1 if args.hbm else 0)]

        def timed(call):  # call(ours, packed, qs) -> one product of that copy
            return cycle_us([lambda c=c: call(*c) for c in copies]) if args.hbm else graph_us(lambda: call(*copies[0]))
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            ref = x.float() @ wd.float().t()
            t_bnb = timed(lambda w_, p_, q_: bnb.matmul_4bit(x, p_.t(), quant_state=q_))
            rows = []
            if args.table:
                grid = nf4_configs.forward_candidates(cap, M, N, K)
                gemv = nf4_configs.gemv_candidates(1, N, K, cuda=True)
                gemv2 = nf4_configs.gemv_candidates(2, N, K, cuda=True)
            rowwise = gemv if M == 1 else gemv2 if M <= nf4_configs.CUDA_GEMV_MAX_M else []
            cols = mma_cols if M <= nf4_configs.COLS_MAX_M else []
            for c in grid + rowwise + (mma if M <= 16 else []) + cols:
                if isinstance(c, D):
                    f = (lambda w_, *_, c=c: nf4_decode_mma(x, w_, c))
                elif K % c.bk or K // c.bk < c.split_k * 2:
                    continue
                elif isinstance(c, G):
                    f = (lambda w_, *_, c=c: (nf4_gemv_cuda if c.cuda else nf4_gemv)(x, w_, c))
                else:
                    f = (lambda w_, *_, c=c: nf4_matmul_fwd(x, [w_], c)[0])
                err = ((f(w).float() - ref).norm() / ref.norm()).item()
                t = timed(f)
                if t is not None:
                    rows.append((t, c.short(), err))
            rows.sort()
            bad = [r for r in rows if not r[2] < 1e-2]
            out[f"{name} M={M}"] = {"bnb_graph_us": t_bnb, "rows": rows}
            print(f"{name} M={M}: bnb {t_bnb:.1f} µs | " + " | ".join(f"{c} {t:.1f}" for t, c, _ in rows[:6])
                  + f" | bnb / best {t_bnb / rows[0][0]:.2f} | BAD {bad[:3]}", flush=True)
        del w, packed, qs, wd, copies
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after each shape: a run cut short keeps what it measured
            json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
