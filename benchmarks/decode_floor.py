"""The floor under a few-row NF4 product in a captured decode step, beside what bitsandbytes
and fastqlora take: is "2.5x bitsandbytes" (issue #8's target at M <= 16) above it?

For each Llama-3-8B projection shape, in the harness the decode numbers use (``graph_us``:
20 calls captured in a CUDA graph, best of 5 replays; the weights stay in L2 between calls):

- ``launch``: a kernel that touches 16 elements (what any kernel costs in the graph);
- ``read``: one sum over the packed weight's bytes as int32 words (each read once; the absmax,
  1/32 of them, left out so that this stays one kernel);
- ``stream``: the fastest of a few block sizes of a plain Triton read (each program loads its
  block of words with 16-byte loads and writes one partial sum; checked against torch's sum):
  what reading the bytes once costs with no reduction pass, the floor any decode kernel sits on;
- ``copy``: a device copy of the packed weight (its bytes read and written);
- bitsandbytes' ``matmul_4bit`` and fastqlora's ``frozen_matmul`` (no LoRA) at M = 1, 2, 16.

``--hbm``: each call of the graph reads its own copy of the weight (``cycle_us``: enough copies
to fill 4x the L2), so every row reads its bytes from HBM, as a model's decode step does (a
layer's weights are read once a token, after the other layers' have been through the L2).

    python benchmarks/decode_floor.py [--hbm] [--m 1,2,16] [--shapes q/o,k/v] [--ours-only] [--out results/decode_floor.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import SHAPES, cycle_us, graph_us, l2_copies, make_weight  # noqa: E402


@functools.lru_cache(maxsize=None)
def _stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def stream_read(p, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(p + offs, mask=offs < n, other=0)
        tl.store(out + tl.program_id(0), tl.sum(v, 0))

    return stream_read


def stream_us(copies: list[torch.Tensor], hbm: bool) -> float:
    """Graph-timed µs of the fastest plain read of one of ``copies`` (int32 words of the same
    size; ``hbm``: each call a different copy, else the first), each copy's sum checked."""
    kernel = _stream_kernel()
    n = copies[0].numel()
    wants = [words.sum(dtype=torch.int32).item() for words in copies]
    best = float("inf")
    for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8)):
        grid = (n + block - 1) // block
        out = torch.empty(grid, dtype=torch.int32, device=copies[0].device)
        calls = [lambda words=words: kernel[(grid,)](words, out, n, BLOCK=block, num_warps=warps) for words in copies]
        for fn, want in zip(calls, wants):
            fn()
            # int32 sums wrap modulo 2^32 in any order, so the partials' total must equal torch's
            if out.sum(dtype=torch.int32).item() != want:
                raise RuntimeError(f"stream read (block {block}): partial sums disagree with torch's sum")
        best = min(best, timed(calls, hbm))
    return best


def timed(calls: list, hbm: bool) -> float:
    """µs of one call: cycling through ``calls`` (one a weight copy) with ``hbm``, else the first alone."""
    return cycle_us(calls) if hbm else graph_us(calls[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", default="1,2,16")
    ap.add_argument("--hbm", action="store_true", help="each call reads its own weight copy from HBM (see above)")
    ap.add_argument("--ours-only", action="store_true",
                    help="time fastqlora alone (no floors, no bitsandbytes): A/B of two builds")
    ap.add_argument("--shapes", default=None, help="a subset of " + ",".join(s[0] for s in SHAPES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_floor.py needs a CUDA GPU")
    shapes = SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s[0] for s in SHAPES})
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}; choose from {[s[0] for s in SHAPES]}")
        shapes = [s for s in SHAPES if s[0] in wanted]
    ours_only = args.ours_only
    if not ours_only:
        import bitsandbytes as bnb

    from fastqlora.ops import nf4_dispatch
    from fastqlora.ops.nf4_linear import frozen_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    tiny = torch.zeros(16, device="cuda")
    t_launch = graph_us(lambda: tiny.add_(1.0))
    print(f"launch (16 elements): {t_launch:.2f} us")
    rows = []
    hbm = args.hbm
    for name, N, K in shapes:
        copies = [make_weight(N, K, gen)[:3] for _ in range(l2_copies(N * K // 2) if hbm else 1)]
        w, packed, qs = copies[0]
        nbytes = packed.numel()
        row = {"shape": name, "N": N, "K": K, "bytes": nbytes, "copies": len(copies), "launch_us": t_launch,
               "by_m": {}}
        t_stream = float("nan")
        if not ours_only:
            words = [c[1].reshape(-1).view(torch.int32) for c in copies]
            t_read = timed([lambda v=v: v.sum(dtype=torch.int32) for v in words], hbm)
            dst = torch.empty_like(packed)
            t_copy = timed([lambda c=c: dst.copy_(c[1]) for c in copies], hbm)
            t_stream = stream_us(words, hbm)
            row.update(read_us=t_read, copy_us=t_copy, stream_us=t_stream)
            print(f"{name}: {nbytes / 1e6:.1f} MB x {len(copies)} copies; read {t_read:.1f} us, copy {t_copy:.1f} us, "
                  f"stream read {t_stream:.1f} us ({nbytes / t_stream / 1e6:.2f} TB/s)", flush=True)
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            tb = float("nan") if ours_only else timed(
                [lambda c=c: bnb.matmul_4bit(x, c[1].t(), quant_state=c[2]) for c in copies], hbm)
            before = set(nf4_dispatch.choices().items())
            frozen_matmul(x, [w])  # the dispatch's first call times its candidates
            picked = [v for k, v in nf4_dispatch.choices().items() if (k, v) not in before]
            to = timed([lambda c=c: frozen_matmul(x, [c[0]]) for c in copies], hbm)
            row["by_m"][M] = {"bnb_us": tb, "ours_us": to, "target_us": tb / 2.5, "picked": picked}
            how = ', '.join(picked) or 'cached'
            if ours_only:
                print(f"  {name} M={M:2d}: ours {to:5.1f} us | {how}", flush=True)
            else:
                print(f"  {name} M={M:2d}: bnb {tb:5.1f} | ours {to:5.1f} ({tb / to:.2f}x) | 2.5x target {tb / 2.5:5.1f} "
                      f"us | stream read {t_stream:5.1f} | {how}", flush=True)
        rows.append(row)
        del copies, w, packed, qs
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "hbm": hbm, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
