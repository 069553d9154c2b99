"""RMSNorm, RoPE, SwiGLU and the fused lm_head cross-entropy on Llama-3-8B shapes,
against torch eager and torch.compile of the references, in one run.

Floors (bytes each kernel must move, over the measured copy bandwidth B ≈ 3.0 TB/s):
  RMSNorm   fwd: read x, write y (4 B/elem bf16); bwd: read dy, x, write dx (6 B/elem)
  RoPE      fwd and bwd: read and write q, k (4 B/elem each way)
  SwiGLU    fwd: read g, u, write h (6 B/elem); bwd: read dh, g, u, write dg, du (10 B/elem)
  Cross-entropy: dominated by the matmuls h·Wᵀ and G·W (2 × 2·T·H·V FLOPs); the target
  is ≤ 1.1× the time of the lm_head matmul plus torch's cross-entropy, forward+backward.

    python benchmarks/bench_kernels.py --out results/kernels.json
"""
from __future__ import annotations

import argparse
import json
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


def fwd_bwd(fn, *inputs, grad):
    """Time forward + backward of fn on fresh leaves each call."""
    def run():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        fn(*leaves).backward(grad)
    return run


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def bench_rms(T, copy_gbs, rows):
    x = torch.randn(T, H, device="cuda", dtype=BF16)
    w = torch.randn(H, device="cuda", dtype=BF16) * 0.1 + 1
    dy = torch.randn_like(x)
    y, r = rms_norm_forward(x, w, 1e-5, False)
    n = x.numel()
    # the floor for this many bytes: a copy that reads and writes 10n bytes in all
    a = torch.empty(5 * n, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    same = ms(lambda: b.copy_(a))
    del a, b
    sweep = {nw: (ms(lambda: rms_norm_forward(x, w, 1e-5, False, num_warps=nw)),
                  ms(lambda: rms_norm_backward(dy, x, w, r, False, False, num_warps=nw))) for nw in (4, 8, 16)}
    t_f = ms(lambda: rms_norm_forward(x, w, 1e-5, False))
    t_b = ms(lambda: rms_norm_backward(dy, x, w, r, False, False))
    ref = lambda x_: rms_norm_reference(x_, w, 1e-5)  # noqa: E731
    with backend("triton"):
        ours = ms(fwd_bwd(lambda x_: rms_norm(x_, w, 1e-5), x, grad=dy))
    eager = ms(fwd_bwd(ref, x, grad=dy))
    comp = ms(fwd_bwd(compiled(ref), x, grad=dy))
    rows.append(dict(op="rms_norm", tokens=T, fwd_GBps=4 * n / t_f / 1e6, bwd_GBps=6 * n / t_b / 1e6,
                     pct_copy=100 * (10 * n / (t_f + t_b) / 1e6) / copy_gbs,
                     pct_same_size_copy=100 * same / (t_f + t_b), ours_ms=ours, eager_ms=eager,
                     compile_ms=comp, warps_sweep={k: [v[0], v[1], 100 * 10 * n / (v[0] + v[1]) / 1e6 / copy_gbs]
                                                   for k, v in sweep.items()}))


def bench_rope(T, copy_gbs, rows):
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=BF16)
    k = torch.randn(1, T, HK, D, device="cuda", dtype=BF16)
    ang = torch.arange(T, device="cuda", dtype=torch.float32)[:, None] / (500000 ** (
        torch.arange(D // 2, device="cuda") / (D // 2)))[None]
    cos, sin = ang.cos(), ang.sin()
    pos = torch.arange(T, device="cuda")[None]
    n = q.numel() + k.numel()
    a = torch.empty(4 * n, device="cuda", dtype=torch.uint8)  # same-size copy: 8n bytes moved
    b = torch.empty_like(a)
    same = ms(lambda: b.copy_(a))
    del a, b
    sweep = {nw: (ms(lambda: rope_(q, k, cos, sin, pos, num_warps=nw)),
                  ms(lambda: rope_(q, k, cos, sin, pos, backward=True, num_warps=nw))) for nw in (2, 4, 8)}
    t_f = ms(lambda: rope_(q, k, cos, sin, pos))
    t_b = ms(lambda: rope_(q, k, cos, sin, pos, backward=True))
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(impl):
        def step():
            qq = q.detach().requires_grad_(True)
            kk = k.detach().requires_grad_(True)
            a, b = impl(qq * 1, kk * 1, cos, sin, pos)
            torch.autograd.backward([a, b], [dq, dk])
        return step

    with backend("triton"):
        ours = ms(run(apply_rope))
    eager = ms(run(apply_rope_reference))
    comp = ms(run(compiled(apply_rope_reference)))
    rows.append(dict(op="rope", tokens=T, fwd_GBps=4 * n / t_f / 1e6, bwd_GBps=4 * n / t_b / 1e6,
                     pct_copy=100 * (8 * n / (t_f + t_b) / 1e6) / copy_gbs,
                     pct_same_size_copy=100 * same / (t_f + t_b),
                     warps_sweep={k_: [v[0], v[1], 100 * 8 * n / (v[0] + v[1]) / 1e6 / copy_gbs]
                                  for k_, v in sweep.items()}, ours_ms=ours, eager_ms=eager,
                     compile_ms=comp))


def bench_act(T, copy_gbs, rows):
    g = torch.randn(T, I, device="cuda", dtype=BF16)
    u = torch.randn(T, I, device="cuda", dtype=BF16)
    dh = torch.randn_like(g)
    g2, u2 = g.clone(), u.clone()
    t_f = ms(lambda: act_mul_forward(g, u, False))
    t_b = ms(lambda: act_mul_backward_(dh, g2, u2, False))
    n = g.numel()

    def run(impl):
        def step():
            gg, uu = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
            impl(gg * 1, uu * 1).backward(dh)
        return step

    from fastqlora.ops.activation import act_mul

    with backend("triton"):
        ours = ms(run(lambda a, b: act_mul(a, b, "silu")))
    ref = lambda a, b: act_mul_reference(a, b, "silu")  # noqa: E731
    eager = ms(run(ref))
    comp = ms(run(compiled(ref)))
    rows.append(dict(op="swiglu", tokens=T, fwd_GBps=6 * n / t_f / 1e6, bwd_GBps=10 * n / t_b / 1e6,
                     pct_copy=100 * (16 * n / (t_f + t_b) / 1e6) / copy_gbs, ours_ms=ours, eager_ms=eager,
                     compile_ms=comp))


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
    args = p.parse_args()
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    rows: list[dict] = []
    for T in (int(t) for t in args.tokens.split(",")):
        bench_rms(T, copy_gbs, rows)
        bench_rope(T, copy_gbs, rows)
        bench_act(T, copy_gbs, rows)
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
            print(f"{'':22} % of a same-size copy {r['pct_same_size_copy']:.1f}; warps -> % copy: "
                  + ", ".join(f"{k}: {v[2]:.1f}" for k, v in r["warps_sweep"].items()))
        if r["op"] == "linear_cross_entropy":
            print(f"{'':22} lm_head matmul {r['lm_head_matmul_ms']:.3f} ms; peak GiB ours {r['ours_peak_gib']:.2f} "
                  f"eager {r['eager_peak_gib']:.2f} compile {r['compile_peak_gib']:.2f}")


if __name__ == "__main__":
    main()
