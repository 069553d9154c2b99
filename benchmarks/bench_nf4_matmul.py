"""Fused NF4 QLoRA projections against cuBLAS, "dequantize + cuBLAS" and bitsandbytes.

Llama-3-8B's projection shapes (q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096,
down 4096×14336) at M = 1, 16, 4096, 16384 tokens, bf16, one GPU, one run:

* ``cublas``      x·Wᵀ with W already dense bf16 (the ceiling: no dequantization at all)
* ``deq+cublas``  our CUDA dequantize into a reused buffer, then cuBLAS
* ``fused``       the Triton kernel, best of its tuning table (printed), no LoRA
* ``fused+lora``  the same with the r=16 LoRA term in its epilogue (vs ``cublas+lora``:
                  cuBLAS on the dense weight plus the two thin LoRA products)
* ``dispatch``    what the op layer runs (the tuner's pick, LoRA included)
* ``bnb``         bitsandbytes.matmul_4bit (its GEMV kernel at M=1, dequantize + cuBLAS above)
* ``t_*``         the backward's dX = dY·W: cuBLAS on dense W vs the fused transposed kernel

Then the whole LoRA MLP (gate, up, down, SwiGLU, r=16), forward + backward, at M = 4096 and
16384: our ``lora_mlp`` against the PEFT + bitsandbytes path (bnb.matmul_4bit per projection,
separate LoRA products, autograd), with peak memory.

Floors on an H100 SXM (989 TFLOP/s dense bf16 peak, of which cuBLAS reaches ~70-80% on
these shapes; 3.35 TB/s HBM3, ~3.0 TB/s reachable):
* M ≥ 4096 is compute bound: 2·M·N·K flops, e.g. gate at M=4096 is 481 GFLOP ≈ 0.65 ms at
  740 TFLOP/s. Dequantizing its 58.7 M weights (29 MB in, 117 MB out, 117 MB re-read)
  costs ≈ 0.09 ms at 3 TB/s, so "deq+cublas" sits near 88% of cublas at M=4096 and 97% at
  16384; the fused kernel must hide its dequantization behind the tensor cores to beat it.
* M ≤ 16 is bound by reading the weight: 0.5 byte per weight + 1/64 byte of absmax,
  e.g. gate 30.3 MB ≈ 10 µs at 3 TB/s, q 8.4 MB ≈ 2.8 µs (where launch gaps of a few µs
  show); bf16 cuBLAS reads 4× the bytes.

Targets: fused ≥ 85% of cublas time-for-time at M ≥ 4096; ≥ 2.5× bnb at M ≤ 16.

    python benchmarks/bench_nf4_matmul.py --out benchmarks/results/nf4_matmul.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
MS = [1, 16, 4096, 16384]
RANK = 16


def bench(fn, warmup=10, rep=40) -> float:
    """Median ms (triton.testing.do_bench clears L2 between runs: weights come from HBM)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def make_weight(N, K, gen):
    """bitsandbytes' NF4 (double quant) of a random weight, and our container over the same bytes."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(N, K, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    from fastqlora.quant import NF4Tensor

    ours = NF4Tensor(packed.reshape(-1), qs.absmax, torch.Size((N, K)), torch.bfloat16, 64, qs.code.float(),
                     qs.state2.absmax, qs.state2.code.float(), float(qs.offset), 256)
    return ours, packed, qs, bnbf.dequantize_4bit(packed, qs)


def graph_us(fn, n: int = 20) -> float:
    """GPU time of one call in µs: ``n`` calls captured in a CUDA graph, best of 5 replays
    (no host launch cost; weights stay in L2 between calls, which at M <= 16 flatters
    every path alike)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
    except Exception as exc:  # noqa: BLE001 - a path that cannot be captured
        print(f"  (not capturable: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
        return None
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    torch.cuda.synchronize()
    for _ in range(5):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) * 1e3 / n)
    return best


def l2_copies(nbytes: int, factor: int = 4) -> int:
    """How many distinct copies of ``nbytes`` of weights :func:`cycle_us` needs so that
    cycling through them reads each from HBM: their total at least ``factor`` x the GPU's L2."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, -(-factor * l2 // nbytes))


def cycle_us(fns: list) -> float:
    """:func:`graph_us` over calls that take ``fns`` in turn, each a product of its own copy of
    the weights (``l2_copies`` of them): every captured call finds its weights evicted from L2
    by the others', as a model's decode step reads each layer's weights once a token. The
    graph holds max(20, len(fns)) calls; the time is one call's."""
    it = itertools.cycle(fns)
    return graph_us(lambda: next(it)(), n=max(20, len(fns)))


SWEEP: dict | None = None  # --sweep: every candidate's time, keyed by its name


def best_fused(run, cands, label=""):
    """(ms, config) of the fastest candidate that runs."""
    best = (float("inf"), None)
    for cfg in cands:
        try:
            t = bench(lambda: run(cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not fit this GPU
            print(f"  skip {cfg.short()}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        if SWEEP is not None:
            SWEEP.setdefault(label, {})[cfg.short()] = t
            print(f"    {label:28s} {cfg.short():34s} {t * 1e3:9.1f} us", flush=True)
        best = min(best, (t, cfg), key=lambda p: p[0])
    return best


def projections(args, rows, gen):
    import bitsandbytes as bnb

    from fastqlora.ops.nf4_gemv_cuda import available as cuda_gemv_available
    from fastqlora.ops.nf4_gemv_cuda import nf4_gemv_cuda
    from fastqlora.ops.nf4_linear import dense, frozen_matmul
    from fastqlora.triton_kernels import nf4_configs
    from fastqlora.triton_kernels.nf4_configs import GemvConfig
    from fastqlora.triton_kernels.nf4_gemv import nf4_gemv
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd
    from fastqlora.triton_kernels.nf4_matmul_t import nf4_matmul_t

    props = torch.cuda.get_device_properties(0)
    cap = (props.major, props.minor)
    for name, N, K in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        w, packed, qs, wd = make_weight(N, K, gen)
        a = torch.randn(RANK, K, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        b = torch.randn(N, RANK, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        for M in args.m:
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            dy = torch.randn(M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
            xa = x @ a.t()
            r = {"shape": name, "N": N, "K": K, "M": M}
            r["cublas"] = bench(lambda: x @ wd.t())
            r["cublas+lora"] = bench(lambda: torch.addmm(x @ wd.t(), x @ a.t(), b.t(), alpha=2.0))
            r["deq+cublas"] = bench(lambda: x @ dense(w, torch.bfloat16).t())
            def fwd(c, lora=False):
                xa_, b_ = (x @ a.t(), b) if lora else (None, None)
                if isinstance(c, GemvConfig):
                    return (nf4_gemv_cuda if c.cuda else nf4_gemv)(x, w, c, xa=xa_, lora_b=b_, scale=2.0)
                return nf4_matmul_fwd(x, [w], c, xa=xa_, lora_b=[b_], scales=[2.0])

            cands = (nf4_configs.gemv_candidates(M, N, K, cuda=cuda_gemv_available(x, w))
                     + nf4_configs.forward_candidates(cap, M, N, K))
            t, cfg = best_fused(fwd, cands, f"fwd {name} M={M}")
            r["fused"], r["fused_cfg"] = t, cfg.short() if cfg else None
            if cfg is not None:
                r["fused+lora"] = bench(lambda: fwd(cfg, lora=True))
            r["dispatch"] = bench(lambda: frozen_matmul(x, [w], xa=x @ a.t(), lora_b=[b], scales=[2.0]))
            r["bnb"] = bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs))
            if M <= 16:  # GPU-only times (CUDA graphs): what a captured decode step pays
                r["graph_us"] = {
                    "cublas": graph_us(lambda: x @ wd.t()),
                    "deq+cublas": graph_us(lambda: x @ dense(w, torch.bfloat16).t()),
                    "fused": graph_us(lambda: fwd(cfg)) if cfg is not None else None,
                    "bnb": graph_us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)),
                }
                gu = r["graph_us"]
                print(f"  graph µs {name} M={M}: " + ", ".join(f"{k} {v:.1f}" for k, v in gu.items() if v)
                      + (f" | bnb / fused {gu['bnb'] / gu['fused']:.2f}" if gu.get("fused") and gu.get("bnb") else ""),
                      flush=True)
            if M > 1:
                r["t_cublas"] = bench(lambda: dy @ wd)
                r["t_deq+cublas"] = bench(lambda: dy @ dense(w, torch.bfloat16))
                t, cfg = best_fused(lambda c: nf4_matmul_t([dy], [w], c), nf4_configs.transposed_candidates(cap, M, K),
                                    f"t {name} M={M}")
                r["t_fused"], r["t_fused_cfg"] = t, cfg.short() if cfg else None
            del x, dy, xa
            rows.append(r)
            _print_row(r)
        del w, packed, qs, wd
        torch.cuda.empty_cache()


def suggest_defaults(rows) -> dict:
    """Per direction and M: how many shapes the fused kernel beat "dequantize + cuBLAS"."""
    out = {}
    for M in sorted({r["M"] for r in rows if r.get("shape") != "mlp"}):
        rs = [r for r in rows if r.get("M") == M and r.get("shape") != "mlp"]
        for d, f, p in (("fwd", "fused", "deq+cublas"), ("t", "t_fused", "t_deq+cublas")):
            got = [r for r in rs if r.get(f) is not None and r.get(p) is not None]
            if got:
                wins = sum(r[f] < r[p] for r in got)
                out[f"{d} M={M}"] = f"{'fused' if 2 * wins > len(got) else 'dequant+cublas'} ({wins}/{len(got)})"
    return out


def _print_row(r):
    us = lambda k: f"{r[k] * 1e3:9.1f}" if r.get(k) is not None else "        -"  # noqa: E731
    eff = r["cublas"] / r["fused"] if r.get("fused") else float("nan")
    vs_bnb = r["bnb"] / min(r["fused"], r["dispatch"]) if r.get("fused") else float("nan")
    teff = r["t_cublas"] / r["t_fused"] if r.get("t_fused") else float("nan")
    print(f"{r['shape']:8s} {r['M']:6d} |{us('cublas')}{us('deq+cublas')}{us('fused')}{us('fused+lora')}"
          f"{us('cublas+lora')}{us('dispatch')}{us('bnb')} | {eff:5.2f} {vs_bnb:6.2f} |"
          f"{us('t_cublas')}{us('t_deq+cublas')}{us('t_fused')} {teff:5.2f} | {r.get('fused_cfg')} / {r.get('t_fused_cfg')}",
          flush=True)


def mlp(args, rows, gen):
    import bitsandbytes as bnb

    from fastqlora.ops import nf4_dispatch
    from fastqlora.ops.lora_fused import LoraProj
    from fastqlora.ops.lora_mlp import lora_mlp

    H, I = 4096, 14336
    ws = [make_weight(n, k, gen) for n, k in ((I, H), (I, H), (H, I))]

    def adapters():
        return [(torch.randn(RANK, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02,
                 torch.zeros(n, RANK, device="cuda", dtype=torch.bfloat16) + 0.01)
                for n, k in ((I, H), (I, H), (H, I))]

    ad = [tuple(t.requires_grad_() for t in p) for p in adapters()]
    projs = [LoraProj(w[0], None, A, B, 1.0) for w, (A, B) in zip(ws, ad)]

    def peft_proj(x, i):
        _, packed, qs, _ = ws[i]
        A, B = ad[i]
        return bnb.matmul_4bit(x, packed.t(), quant_state=qs) + (x @ A.t()) @ B.t()

    def peft_mlp(x):
        return peft_proj(F.silu(peft_proj(x, 0)) * peft_proj(x, 1), 2)

    for M in args.mlp_m:
        x = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16)
        r = {"shape": "mlp", "M": M}
        for label, fn, forced in (
            ("peft_bnb", peft_mlp, None),
            ("ours", lambda x: lora_mlp(x, *projs, "silu"), None),
            ("ours_fused", lambda x: lora_mlp(x, *projs, "silu"), "fused"),
            ("ours_deq+cublas", lambda x: lora_mlp(x, *projs, "silu"), nf4_dispatch.CUBLAS),
        ):
            with nf4_dispatch.force(forced):
                step = lambda: fn(x).backward(dy)  # noqa: E731
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                r[label + "_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                r[label] = bench(step, warmup=3, rep=30)
            x.grad = None
            for A, B in ad:
                A.grad = B.grad = None
        rows.append(r)
        print(f"mlp fwd+bwd M={M:6d}: peft+bnb {r['peft_bnb']:8.2f} ms ({r['peft_bnb_peak_gib']:.2f} GiB) | ours "
              f"{r['ours']:8.2f} ms ({r['ours_peak_gib']:.2f} GiB) = {r['peft_bnb'] / r['ours']:.2f}x | forced fused "
              f"{r['ours_fused']:.2f} ms, forced deq+cublas {r['ours_deq+cublas']:.2f} ms", flush=True)
        del x, dy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nf4_matmul.json"))
    ap.add_argument("--m", type=int, nargs="+", default=MS)
    ap.add_argument("--mlp-m", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of q/o k/v gate/up down")
    ap.add_argument("--sweep", action="store_true", help="print and keep every candidate config's time")
    args = ap.parse_args()
    global SWEEP
    if args.sweep:
        SWEEP = {}
    if not torch.cuda.is_available():
        raise SystemExit("bench_nf4_matmul.py needs a CUDA GPU")
    import bitsandbytes
    import triton

    from fastqlora.ops import nf4_dispatch

    t0 = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    print(f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bitsandbytes {bitsandbytes.__version__}")
    print("times in µs; eff = cublas/fused (time-for-time); xbnb = bnb / best of ours")
    print(f"{'shape':8s} {'M':>6s} |{'cublas':>9s}{'deq+cub':>9s}{'fused':>9s}{'fus+lora':>9s}{'cub+lora':>9s}"
          f"{'dispatch':>9s}{'bnb':>9s} | {'eff':>5s} {'xbnb':>6s} |{'t_cublas':>9s}{'t_deq+cu':>9s}{'t_fused':>9s}"
          f" {'t_eff':>5s} | configs")
    with torch.no_grad():
        projections(args, rows, gen)
    suggestion = suggest_defaults(rows)
    print("\nfaster path per M over the four shapes (fused wins / shapes), for DEFAULT_PATH "
          "in fastqlora/ops/nf4_dispatch.py:")
    for k, v in suggestion.items():
        print(f"  {k}: {v}")
    mlp(args, rows, gen)
    table = {" ".join(str(p) for p in k): v for k, v in nf4_dispatch.choices().items()}
    print("\ndispatch choices (direction, device, capability, dtype, M bucket, widths, K, rank, forced):")
    for k, v in table.items():
        print(f"  {k}: {v}")
    result = {
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "rows": rows,
        "dispatch": table,
        "faster_path_by_m": suggestion,
        "sweep": SWEEP,
        "seconds": time.time() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
