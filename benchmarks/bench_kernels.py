"""RMSNorm, RoPE, SwiGLU and the fused lm_head cross-entropy on Llama-3-8B shapes,
against torch eager and torch.compile of the references, in one run.

Floors (bytes each kernel must move, over the measured copy bandwidth B):
  RMSNorm   fwd: read x, write y (4 B/elem bf16); bwd: read dy, x, write dx (6 B/elem)
  RoPE      fwd and bwd: read and write q, k (4 B/elem each way)
  SwiGLU    fwd: read g, u, write h (6 B/elem); bwd: read dh, g, u, write dg, du (10 B/elem)
  Cross-entropy: dominated by the matmuls h·Wᵀ and G·W (2 × 2·T·H·V FLOPs); the target
  is ≤ 1.1× the time of the lm_head matmul plus torch's cross-entropy, forward+backward.

Bandwidth figures (GB/s, % of copy) are GPU time only (``timing.gpu_ms``: the host's
launch cost is hidden behind a queued sleep, L2 cleared before each call), for the kernels
and the copies alike; ``*_launch_ms`` keep do_bench's times, which include the launch.
"ours/eager/compile ms" time forward + backward through autograd, GPU time the same way
(where Python's autograd takes longer than the GPU, the gaps count), with peak extra
memory; the cross-entropy rows (milliseconds long) use do_bench.

    python benchmarks/bench_kernels.py --out results/kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton.testing

from fastqlora.ops.activation import act_mul_reference
from fastqlora.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fastqlora.ops.dispatch import backend
from fastqlora.ops.rms_norm import rms_norm, rms_norm_reference
from fastqlora.ops.rope import apply_rope, apply_rope_reference
from fastqlora.triton_kernels.activation import act_mul_backward_, act_mul_forward
from fastqlora.triton_kernels.rms_norm import rms_norm_backward, rms_norm_forward
from fastqlora.triton_kernels.rope import rope_

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import gpu_ms  # noqa: E402

H, HQ, HK, D, I, V = 4096, 32, 8, 128, 14336, 128256
BF16 = torch.bfloat16


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


def peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_floor(moved: int) -> float:
    """GPU ms of a device copy that reads and writes ``moved`` bytes in all."""
    a = torch.empty(moved // 2, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    return gpu_ms(lambda: b.copy_(a))


def fwd_bwd(fn, *inputs, grad):
    """Time forward + backward of fn on fresh leaves each call."""
    def run():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        fn(*leaves).backward(grad)
    return run


def against_torch(ours_fn, ref_fn) -> dict:
    """Forward + backward GPU time and peak extra memory: ours (Triton backend), the
    reference in eager mode and under torch.compile. ``*_fn`` take a backend-free callable
    factory: ``ours_fn()`` -> step, ``ref_fn(impl)`` -> step for an eager or compiled impl."""
    with backend("triton"):
        ours = ours_fn()
        res = {"ours_ms": gpu_ms(ours), "ours_peak_gib": peak(ours)}
    eager, comp = ref_fn(False), ref_fn(True)
    res.update(eager_ms=gpu_ms(eager), eager_peak_gib=peak(eager), compile_ms=gpu_ms(comp),
               compile_peak_gib=peak(comp))
    return res


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def bench_rms(T, copy_gbs, rows):
    x = torch.randn(T, H, device="cuda", dtype=BF16)
    w = torch.randn(H, device="cuda", dtype=BF16) * 0.1 + 1
    dy = torch.randn_like(x)
    y, r = rms_norm_forward(x, w, 1e-5, False)
    n = x.numel()
    # the floor for this many bytes: one copy that reads and writes 10n bytes in all, and
    # the two copies of each kernel's own bytes (fwd 4n, bwd 6n)
    same, same_each = copy_floor(10 * n), copy_floor(4 * n) + copy_floor(6 * n)
    sweep = {nw: (gpu_ms(lambda: rms_norm_forward(x, w, 1e-5, False, num_warps=nw)),
                  gpu_ms(lambda: rms_norm_backward(dy, x, w, r, False, False, num_warps=nw))) for nw in (4, 8, 16)}
    fwd = lambda: rms_norm_forward(x, w, 1e-5, False)  # noqa: E731
    bwd = lambda: rms_norm_backward(dy, x, w, r, False, False)  # noqa: E731
    t_f, t_b = gpu_ms(fwd), gpu_ms(bwd)
    launch = [ms(fwd), ms(bwd)]
    ref = lambda x_: rms_norm_reference(x_, w, 1e-5)  # noqa: E731
    vs = against_torch(lambda: fwd_bwd(lambda x_: rms_norm(x_, w, 1e-5), x, grad=dy),
                       lambda c: fwd_bwd(compiled(ref) if c else ref, x, grad=dy))
    rows.append(dict(op="rms_norm", tokens=T, fwd_GBps=4 * n / t_f / 1e6, bwd_GBps=6 * n / t_b / 1e6,
                     pct_copy=100 * (10 * n / (t_f + t_b) / 1e6) / copy_gbs,
                     pct_same_size_copy=100 * same / (t_f + t_b),
                     pct_copies_per_kernel=100 * same_each / (t_f + t_b), **vs,
                     fwd_ms=t_f, bwd_ms=t_b, fwd_launch_ms=launch[0], bwd_launch_ms=launch[1],
                     warps_sweep={k: [v[0], v[1], 100 * 10 * n / (v[0] + v[1]) / 1e6 / copy_gbs]
                                  for k, v in sweep.items()}))


def bench_rope(T, copy_gbs, rows):
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=BF16)
    k = torch.randn(1, T, HK, D, device="cuda", dtype=BF16)
    ang = torch.arange(T, device="cuda", dtype=torch.float32)[:, None] / (500000 ** (
        torch.arange(D // 2, device="cuda") / (D // 2)))[None]
    cos, sin = ang.cos(), ang.sin()
    pos = torch.arange(T, device="cuda")[None]
    n = q.numel() + k.numel()
    same, same_each = copy_floor(8 * n), 2 * copy_floor(4 * n)  # fwd and bwd move 4n bytes each
    sweep = {nw: (gpu_ms(lambda: rope_(q, k, cos, sin, pos, num_warps=nw)),
                  gpu_ms(lambda: rope_(q, k, cos, sin, pos, backward=True, num_warps=nw))) for nw in (2, 4, 8)}
    fwd = lambda: rope_(q, k, cos, sin, pos)  # noqa: E731
    bwd = lambda: rope_(q, k, cos, sin, pos, backward=True)  # noqa: E731
    t_f, t_b = gpu_ms(fwd), gpu_ms(bwd)
    launch = [ms(fwd), ms(bwd)]
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(impl):
        def step():
            qq = q.detach().requires_grad_(True)
            kk = k.detach().requires_grad_(True)
            a, b = impl(qq * 1, kk * 1, cos, sin, pos)
            torch.autograd.backward([a, b], [dq, dk])
        return step

    vs = against_torch(lambda: run(apply_rope),
                       lambda c: run(compiled(apply_rope_reference) if c else apply_rope_reference))
    rows.append(dict(op="rope", tokens=T, fwd_GBps=4 * n / t_f / 1e6, bwd_GBps=4 * n / t_b / 1e6,
                     pct_copy=100 * (8 * n / (t_f + t_b) / 1e6) / copy_gbs,
                     pct_same_size_copy=100 * same / (t_f + t_b),
                     pct_copies_per_kernel=100 * same_each / (t_f + t_b), fwd_ms=t_f, bwd_ms=t_b,
                     fwd_launch_ms=launch[0], bwd_launch_ms=launch[1],
                     warps_sweep={k_: [v[0], v[1], 100 * 8 * n / (v[0] + v[1]) / 1e6 / copy_gbs]
                                  for k_, v in sweep.items()}, **vs))


def bench_act(T, copy_gbs, rows):
    g = torch.randn(T, I, device="cuda", dtype=BF16)
    u = torch.randn(T, I, device="cuda", dtype=BF16)
    dh = torch.randn_like(g)
    g2, u2 = g.clone(), u.clone()
    t_f = gpu_ms(lambda: act_mul_forward(g, u, False))
    t_b = gpu_ms(lambda: act_mul_backward_(dh, g2, u2, False))
    n = g.numel()

    def run(impl):
        def step():
            gg, uu = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
            impl(gg * 1, uu * 1).backward(dh)
        return step

    from fastqlora.ops.activation import act_mul

    ref = lambda a, b: act_mul_reference(a, b, "silu")  # noqa: E731
    vs = against_torch(lambda: run(lambda a, b: act_mul(a, b, "silu")), lambda c: run(compiled(ref) if c else ref))
    rows.append(dict(op="swiglu", tokens=T, fwd_GBps=6 * n / t_f / 1e6, bwd_GBps=10 * n / t_b / 1e6,
                     pct_copy=100 * (16 * n / (t_f + t_b) / 1e6) / copy_gbs, **vs))


def bench_ce(T, rows):
    h = torch.randn(T, H, device="cuda", dtype=BF16)
    w = torch.randn(V, H, device="cuda", dtype=BF16) * 0.02
    labels = torch.randint(0, V, (T,), device="cuda")
    ones = torch.ones((), device="cuda")
    matmul = ms(lambda: h @ w.t())

    def run(impl):
        return fwd_bwd(lambda x: impl(x, w, labels), h, grad=ones)

    with backend("triton"):
        ours = ms(run(linear_cross_entropy))
        ours_mem = peak(run(linear_cross_entropy))
    eager = ms(run(linear_cross_entropy_reference))
    eager_mem = peak(run(linear_cross_entropy_reference))
    comp_fn = compiled(lambda x, w_, lab: linear_cross_entropy_reference(x, w_, lab))
    comp = ms(run(comp_fn))
    comp_mem = peak(run(comp_fn))
    rows.append(dict(op="linear_cross_entropy", tokens=T, lm_head_matmul_ms=matmul, ours_ms=ours, eager_ms=eager,
                     compile_ms=comp, ours_peak_gib=ours_mem, eager_peak_gib=eager_mem, compile_peak_gib=comp_mem,
                     ratio_vs_eager=ours / eager))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--ops", default="rms,rope,act,ce", help="a subset of rms,rope,act,ce")
    args = p.parse_args()
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / gpu_ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    rows: list[dict] = []
    ops = args.ops.split(",")
    for T in (int(t) for t in args.tokens.split(",")):
        if "rms" in ops:
            bench_rms(T, copy_gbs, rows)
        if "rope" in ops:
            bench_rope(T, copy_gbs, rows)
        if "act" in ops:
            bench_act(T, copy_gbs, rows)
        if "ce" in ops:
            bench_ce(T, rows)
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "copy_GBps": copy_gbs, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{res['device']}, copy {copy_gbs:,.0f} GB/s")
    print(f"{'op':22} {'T':>6} {'fwd GB/s':>9} {'bwd GB/s':>9} {'%copy':>6} {'ours ms':>8} {'eager':>8} {'compile':>8}")
    for r in rows:
        print(f"{r['op']:22} {r['tokens']:6} {r.get('fwd_GBps', 0):9.0f} {r.get('bwd_GBps', 0):9.0f} "
              f"{r.get('pct_copy', 0):6.1f} {r['ours_ms']:8.3f} {r['eager_ms']:8.3f} {r['compile_ms']:8.3f}")
        if "warps_sweep" in r:
            print(f"{'':22} % of a same-size copy {r['pct_same_size_copy']:.1f}, of a copy of each kernel's bytes "
                  f"{r['pct_copies_per_kernel']:.1f}; warps -> % copy: "
                  + ", ".join(f"{k}: {v[2]:.1f}" for k, v in r["warps_sweep"].items()))
            print(f"{'':22} fwd/bwd GPU-only {1e3 * r['fwd_ms']:.1f}/{1e3 * r['bwd_ms']:.1f} us, with launch "
                  f"(do_bench) {1e3 * r['fwd_launch_ms']:.1f}/{1e3 * r['bwd_launch_ms']:.1f} us")
        head = f"lm_head matmul {r['lm_head_matmul_ms']:.3f} ms; " if "lm_head_matmul_ms" in r else ""
        print(f"{'':22} {head}peak GiB ours {r['ours_peak_gib']:.3f} eager {r['eager_peak_gib']:.3f} "
              f"compile {r['compile_peak_gib']:.3f}")


if __name__ == "__main__":
    main()
