"""One decode product, one config, a few calls: the target for a profiler (ncu, nsys).

Runs an NF4 product of a Llama-3-8B projection shape at M rows of x through one kernel
configuration (the extension's CUDA gemv, its tensor-core decode, or bitsandbytes'
``matmul_4bit``), checks it against bitsandbytes' dequantize + an fp32 matmul, and prints its
graph-timed µs (``bench_nf4_matmul.graph_us``). Under ncu, profile the last launches, e.g.

    ncu --set full -k regex:nf4_decode_mma -s 5 -c 1 -o out/qo_m2_s8 \\
        python benchmarks/decode_one.py --shape q/o --m 2 --config mma:8:1

Configs: ``mma:SPLIT:KB[:cols|:cols8]``, ``mma:gGROUPS:cols`` (csrc/nf4_decode_mma.cu),
``gemv:ROWS:SPLIT:WARPS`` (csrc/nf4_gemv.cu), ``bnb``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_matmul import SHAPES, graph_us, make_weight  # noqa: E402


def parse_config(text: str):
    """``mma:S:KB`` -> DecodeMmaConfig (``mma:S:KB:cols`` the column layout, ``mma:S:KB:cols8``
    with 8 weight rows a warp, ``mma:gG:cols`` its 16-warp blocks of G row groups),
    ``gemv:R:S:W`` -> GemvConfig(cuda=True), ``bnb`` -> "bnb"."""
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig, GemvConfig

    kind, *nums = text.split(":")
    cols = kind == "mma" and len(nums) in (2, 3) and nums[-1] in ("cols", "cols8")
    rows = 8 if cols and nums[-1] == "cols8" else 16
    if cols:
        nums = nums[:-1]
    if cols and rows == 16 and len(nums) == 1 and nums[0][:1] == "g" and nums[0][1:].isdigit():
        return DecodeMmaConfig(0, cols=True, groups=int(nums[0][1:]))
    try:
        values = [int(v) for v in nums]
    except ValueError:
        values = None
    if kind == "bnb" and not nums:
        return "bnb"
    if kind == "mma" and values is not None and len(values) == 2:
        return DecodeMmaConfig(values[0], values[1], cols=cols, rows=rows)
    if kind == "gemv" and values is not None and len(values) == 3:
        return GemvConfig(values[0], values[1], values[2], cuda=True)
    raise ValueError(f"--config {text!r}: expected mma:SPLIT:KB[:cols|:cols8], mma:gGROUPS:cols, "
                     f"gemv:ROWS:SPLIT:WARPS or bnb")


def main(argv: list[str] | None = None) -> None:
    shapes = {name: (n, k) for name, n, k in SHAPES}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="q/o", choices=sorted(shapes))
    ap.add_argument("--m", type=int, default=1, help="rows of x (1-16)")
    ap.add_argument("--config", default="mma:8:1")
    ap.add_argument("--calls", type=int, default=8, help="plain launches after the timing (what a profiler sees last)")
    args = ap.parse_args(argv)
    cfg = parse_config(args.config)  # bad input fails before the GPU is touched
    if not 1 <= args.m <= 16:
        raise SystemExit(f"--m must be 1..16, got {args.m}")
    if not torch.cuda.is_available():
        raise SystemExit("decode_one.py needs a CUDA GPU")
    import bitsandbytes as bnb

    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma
    from fastqlora.ops.nf4_gemv_cuda import nf4_gemv_cuda
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    n, k = shapes[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w, packed, qs, wd = make_weight(n, k, gen)
    x = torch.randn(args.m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    if cfg == "bnb":
        fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)  # noqa: E731
    elif isinstance(cfg, DecodeMmaConfig):
        fn = lambda: nf4_decode_mma(x, w, cfg)  # noqa: E731
    else:
        fn = lambda: nf4_gemv_cuda(x, w, cfg)  # noqa: E731
    ref = x.float() @ wd.float().t()
    err = ((fn().float() - ref).norm() / ref.norm()).item()
    us = graph_us(fn)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"{args.shape} M={args.m} {args.config}: {us:.2f} µs (graph-timed), relative error {err:.1e}")


if __name__ == "__main__":
    main()
