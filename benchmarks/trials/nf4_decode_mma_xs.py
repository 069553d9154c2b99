"""TRIAL runner (GPU): x staged in shared memory for the tensor-core NF4 decode.

Builds ``nf4_decode_mma_xs.cu`` (the package kernel with an XS path; see its head) through
torch's extension loader, then in one run:

1. correctness: odd shapes (rows past N, K not a multiple of the sub-chunk, K = 64), M = 1, 3,
   8, 9, 16, bf16/fp16, nested and plain absmax, LoRA (rank 40, xa a column slice) and bias,
   K split over 2/4 warps and 1/3/7 grid blocks, against the fp64 oracle; XS against the
   control (XS off) bit for bit where the grid split is the same (kb = 1: the same blocks in
   the same order), the control against the package op bit for bit, and every launch run
   twice and equal;
2. graph-timed µs on Llama-3-8B's projection shapes at M = 1, 2, 4, 8, 16: each config of the
   dispatch's table with XS off and on, the package op, and bitsandbytes' 4-bit matmul.

    python benchmarks/trials/nf4_decode_mma_xs.py --out results.json [--quick]

Prints a table; writes every time to the JSON. Exits non-zero when a check fails.
``--one gate/up,16,2,1,xs`` instead runs that one launch 5 times (shape, M, split, kb, xs or
control), for ncu: ``ncu --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables
--section WarpStateStats -k regex:k_nf4_decode_mma -s 2 -c 1 python ... --one ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def build():
    from torch.utils.cpp_extension import load

    t0 = time.time()
    ext = load("nf4_decode_mma_xs_trial", [os.path.join(HERE, "nf4_decode_mma_xs.cu")],
               extra_include_paths=[os.path.join(ROOT, "csrc")],
               extra_cuda_cflags=["-O3", "--fmad=false", "-std=c++17", "-DFASTQLORA_WITH_CUDA=1"], verbose=False)
    print(f"trial built in {time.time() - t0:.0f} s", flush=True)
    return ext


class Trial:
    """The trial kernel behind the package op's arguments (ops/nf4_decode_mma.py)."""

    def __init__(self, ext):
        self.ext = ext
        self.counters = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
        self.ws: dict[tuple, torch.Tensor] = {}

    def __call__(self, x, w, split, kb, xs, xa=None, lora_b=None, scale=1.0, bias=None):
        from fastqlora._ext import ptr, stream_of
        from fastqlora.quant import _DTYPE_CODES

        M, K = x.shape
        N = int(w.shape[0])
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        ws = None
        if kb > 1:
            key = (kb, M, N)
            if key not in self.ws:
                self.ws[key] = torch.empty(kb * M * N, device=x.device, dtype=torch.float32)
            ws = self.ws[key]
        has_lora = xa is not None
        b_c = lora_b.contiguous() if has_lora else None
        code = w.code.float()
        nested = w.nested
        self.ext.decode(
            ptr(x), M, K, ptr(w.packed), ptr(code),
            0 if nested else ptr(w.absmax), ptr(w.absmax) if nested else 0,
            ptr(w.nested_code) if nested else 0, ptr(w.nested_absmax) if nested else 0,
            float(w.nested_offset or 0.0), int(w.nested_blocksize), N,
            ptr(xa) if has_lora else 0, int(xa.stride(0)) if has_lora else 0, ptr(b_c) if has_lora else 0,
            int(lora_b.shape[1]) if has_lora else 0, float(scale), ptr(bias), ptr(y), _DTYPE_CODES[x.dtype],
            int(split), int(kb), ptr(ws), ptr(self.counters), stream_of(x), bool(xs))
        return y


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(trial) -> list:
    import _nf4_helpers as nf4h
    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    bad, n = [], 0
    for N, K, r in ((1000, 4160, 16), (37, 64, 40), (4097, 14336, 8), (333, 4096, 16), (17, 192, 40)):
        for nested in (True, False):
            g = torch.Generator().manual_seed(N + K + r)
            w = NF4Tensor.quantize((torch.randn(N, K, generator=g) * 0.05).cuda(), blocksize=64,
                                   compress_statistics=nested)
            wd = nf4h.dequantize_oracle(w, torch.float64)
            for dtype in (torch.bfloat16, torch.float16):
                tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
                b = (torch.randn(N, r, generator=g) * 0.1).to("cuda", dtype)
                bias = torch.randn(N, generator=g).to("cuda", dtype)
                for M in (1, 3, 8, 9, 16):
                    x = torch.randn(M, K, generator=g).to("cuda", dtype)
                    xa = (torch.randn(M, r + 5, generator=g) * 0.5).to("cuda", dtype)[:, 3:3 + r]
                    ref = x.double() @ wd.t() + 1.5 * (xa.double() @ b.double().t()) + bias.double()
                    for split in (2, 4):
                        for kb in (1, 3, 7):
                            kw = dict(xa=xa, lora_b=b, scale=1.5, bias=bias)
                            y_xs = trial(x, w, split, kb, True, **kw)
                            y_ctl = trial(x, w, split, kb, False, **kw)
                            y_pkg = nf4_decode_mma(x, w, DecodeMmaConfig(split, kb), **kw)
                            where = (N, K, nested, str(dtype), M, split, kb)
                            e = rel(y_xs, ref)
                            n += 1
                            if not e < tol:
                                bad.append(("xs vs oracle", where, e))
                            if not torch.equal(trial(x, w, split, kb, True, **kw), y_xs):
                                bad.append(("xs twice", where))
                            if kb == 1 and not torch.equal(y_xs, y_ctl):
                                bad.append(("xs vs control", where, rel(y_xs, y_ctl)))
                            if not torch.equal(y_ctl, y_pkg):
                                bad.append(("control vs package", where, rel(y_ctl, y_pkg)))
                            e0 = rel(trial(x, w, split, kb, True), x.double() @ wd.t())
                            if not e0 < tol:
                                bad.append(("xs no lora vs oracle", where, e0))
    torch.cuda.synchronize()
    print(f"correctness: {n} launches checked, {len(bad)} failures", flush=True)
    for b_ in bad[:20]:
        print("  FAIL", b_, flush=True)
    return bad


def sweep(trial, ms, quick: bool) -> dict:
    import bitsandbytes as bnb
    from bench_nf4_matmul import SHAPES, graph_us, make_weight
    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig, decode_mma_candidates

    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    cfgs = decode_mma_candidates(16, cuda=True)
    if not quick:
        cfgs = sorted(set(cfgs) | {DecodeMmaConfig(s, kb) for s in (2, 4) for kb in (1, 2, 4, 8)}, key=str)
    for name, N, K in SHAPES:
        w, packed, qs, _ = make_weight(N, K, gen)
        for M in ms:
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            t_bnb = graph_us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs))
            rows = []
            for c in cfgs:
                rows.append(("package", c.split, c.kb, graph_us(lambda: nf4_decode_mma(x, w, c))))
                rows.append(("control", c.split, c.kb, graph_us(lambda: trial(x, w, c.split, c.kb, False))))
                rows.append(("xs", c.split, c.kb, graph_us(lambda: trial(x, w, c.split, c.kb, True))))
            best = {k: min((r for r in rows if r[0] == k), key=lambda r: r[3]) for k in ("package", "control", "xs")}
            out[f"{name} M={M}"] = {"bnb_us": t_bnb, "rows": rows, "best": best}
            print(f"{name:8s} M={M:2d}: bnb {t_bnb:6.1f} | " + " | ".join(
                f"{k} {b[3]:6.1f} (s{b[1]} kb{b[2]}, {t_bnb / b[3]:.2f}x)" for k, b in best.items()), flush=True)
    return out


def one(trial, spec: str) -> None:
    from bench_nf4_matmul import SHAPES, make_weight

    name, M, split, kb, kind = spec.split(",")
    (N, K), = [(n, k) for nm, n, k in SHAPES if nm == name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w, *_ = make_weight(N, K, gen)
    x = torch.randn(int(M), K, device="cuda", generator=gen, dtype=torch.bfloat16)
    for _ in range(5):
        trial(x, w, int(split), int(kb), kind == "xs")
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--quick", action="store_true", help="only the dispatch's configs in the sweep")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--one", default=None, help="shape,M,split,kb,xs|control: one launch 5 times (for ncu)")
    args = ap.parse_args()
    trial = Trial(build())
    if args.one:
        return one(trial, args.one)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    bad = [] if args.no_check else check(trial)
    result["failures"] = [str(b) for b in bad]
    result["sweep"] = sweep(trial, [int(m) for m in args.m.split(",")], args.quick)
    with open(args.out or os.devnull, "w") as f:
        json.dump(result, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
