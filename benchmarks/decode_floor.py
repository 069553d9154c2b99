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

    python benchmarks/decode_floor.py [--out results/decode_floor.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import SHAPES, graph_us, make_weight  # noqa: E402


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


def stream_us(words: torch.Tensor) -> float:
    """Graph-timed µs of the fastest plain read of ``words`` (int32), its sum checked."""
    kernel = _stream_kernel()
    n = words.numel()
    want = words.sum(dtype=torch.int32).item()
    best = float("inf")
    for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8)):
        grid = (n + block - 1) // block
        out = torch.empty(grid, dtype=torch.int32, device=words.device)
        fn = lambda: kernel[(grid,)](words, out, n, BLOCK=block, num_warps=warps)  # noqa: E731
        fn()
        # int32 sums wrap modulo 2^32 in any order, so the partials' total must equal torch's
        if out.sum(dtype=torch.int32).item() != want:
            raise RuntimeError(f"stream read (block {block}): partial sums disagree with torch's sum")
        best = min(best, graph_us(fn))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", default="1,2,16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_floor.py needs a CUDA GPU")
    import bitsandbytes as bnb

    from fastqlora.ops import nf4_dispatch
    from fastqlora.ops.nf4_linear import frozen_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    tiny = torch.zeros(16, device="cuda")
    t_launch = graph_us(lambda: tiny.add_(1.0))
    print(f"launch (16 elements): {t_launch:.2f} us")
    rows = []
    for name, N, K in SHAPES:
        w, packed, qs, _ = make_weight(N, K, gen)
        words = packed.reshape(-1).view(torch.int32)
        nbytes = packed.numel()
        t_read = graph_us(lambda: words.sum(dtype=torch.int32))
        dst = torch.empty_like(packed)
        t_copy = graph_us(lambda: dst.copy_(packed))
        t_stream = stream_us(words)
        row = {"shape": name, "N": N, "K": K, "bytes": nbytes, "launch_us": t_launch, "read_us": t_read,
               "copy_us": t_copy, "stream_us": t_stream, "by_m": {}}
        print(f"{name}: {nbytes / 1e6:.1f} MB; read {t_read:.1f} us, copy {t_copy:.1f} us, stream read {t_stream:.1f} us "
              f"({nbytes / t_stream / 1e6:.2f} TB/s)", flush=True)
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            tb = graph_us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs))
            before = set(nf4_dispatch.choices().items())
            frozen_matmul(x, [w])  # the dispatch's first call times its candidates
            picked = [v for k, v in nf4_dispatch.choices().items() if (k, v) not in before]
            to = graph_us(lambda: frozen_matmul(x, [w]))
            row["by_m"][M] = {"bnb_us": tb, "ours_us": to, "target_us": tb / 2.5, "picked": picked}
            print(f"  M={M:2d}: bnb {tb:5.1f} | ours {to:5.1f} ({tb / to:.2f}x) | 2.5x target {tb / 2.5:5.1f} us "
                  f"| stream read {t_stream:5.1f} | {', '.join(picked) or 'cached'}", flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
