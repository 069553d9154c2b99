"""Flash attention (Triton) against torch SDPA's backends on Llama-3-8B attention shapes
(batch 1, 32 query heads, 8 KV heads, head dim 128, causal, bf16), and packed rows of
mixed lengths against padding them for SDPA.

FLOPs: a causal forward does 4·S²·Hq·D / 2 (two matmuls, half the square); forward +
backward counts 3.5× the forward (backward = 2.5×: recompute S, dV, dP, dQ, dK).
Floor at the measured bf16 rate (~720 TFLOP/s on H100): S = 8192 fwd+bwd
≈ 3.5·4·8192²·32·128/2 / 7.2e14 ≈ 2.7 ms.

    python benchmarks/bench_flash_attention.py --out results/flash.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastqlora.ops.attention import attention
from fastqlora.ops.dispatch import backend

HQ, HK, D = 32, 8, 128
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def inputs(B, S):
    q = torch.randn(B, S, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, HK, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, HK, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def ours(q, k, v, **kw):
    with backend("triton"):
        return attention(q, k, v, **kw)


def sdpa(q, k, v, **kw):
    # SDPA takes [B, H, S, D]; GQA through enable_gqa where the backend takes it, else
    # through K/V repeated to the query heads (the way transformers feeds it)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True, **kw).transpose(1, 2)
    except RuntimeError:
        rep = q.shape[2] // k.shape[2]
        return F.scaled_dot_product_attention(qt, kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1),
                                              **kw).transpose(1, 2)


def timed(fn, q, k, v, **kw):
    do = torch.randn_like(q)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    fwd = ms(lambda: fn(q, k, v, **kw))

    def both():
        fn(*leaves, **kw).backward(do)

    return fwd, ms(both)


FWD_SWEEP = [dict(fwd_m=128, fwd_n=64, fwd_warps=8, fwd_stages=2), dict(fwd_m=128, fwd_n=64, fwd_warps=8, fwd_stages=3),
             dict(fwd_m=128, fwd_n=128, fwd_warps=8, fwd_stages=2), dict(fwd_m=128, fwd_n=64, fwd_warps=4, fwd_stages=3),
             dict(fwd_m=64, fwd_n=64, fwd_warps=4, fwd_stages=3)]
# The dK/dV kernel's tiles with the dQ kernel held at the default (128 x 64, 8 warps, 3
# stages): the profile shows dK/dV at ~350 TFLOP/s against dQ's ~600.
DKDV_SWEEP = [dict(bwd_m=m, bwd_n=n, bwd_warps=w, bwd_stages=st, dq_warps=8, dq_stages=3)
              for m, n, w, st in [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 1), (64, 64, 8, 3), (64, 64, 8, 2),
                                  (32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (128, 128, 8, 1),
                                  (32, 128, 8, 1), (32, 64, 4, 1), (32, 64, 4, 2), (64, 64, 4, 1), (64, 128, 4, 1)]]
BWD_SWEEP = [dict(bwd_m=64, bwd_n=128, dq_m=128, dq_n=64, bwd_warps=8, bwd_stages=2),
             dict(bwd_m=32, bwd_n=128, dq_m=128, dq_n=32, bwd_warps=8, bwd_stages=2),
             dict(bwd_m=64, bwd_n=64, dq_m=64, dq_n=64, bwd_warps=4, bwd_stages=3),
             dict(bwd_m=32, bwd_n=64, dq_m=64, dq_n=32, bwd_warps=4, bwd_stages=2),
             dict(bwd_m=64, bwd_n=128, dq_m=128, dq_n=64, bwd_warps=8, bwd_stages=3)]


def sweep(S: int = 8192, fwd_list: list | None = None, bwd_list: list | None = None) -> dict:
    """Forward configs by forward time, then backward configs with the best forward."""
    import os

    q, k, v = inputs(1, S)
    flops = 4 * S * S * HQ * D / 2
    out = {"fwd": [], "bwd": []}
    for cfg in FWD_SWEEP if fwd_list is None else fwd_list:
        os.environ["FQ_FLASH_CFG"] = json.dumps(cfg)
        try:
            f = ms(lambda: ours(q, k, v))
            out["fwd"].append({**cfg, "tflops": flops / f / 1e9})
        except Exception as exc:
            out["fwd"].append({**cfg, "error": str(exc)[:100]})
    best_fwd = max((c for c in out["fwd"] if "tflops" in c), key=lambda c: c["tflops"])
    for cfg in BWD_SWEEP if bwd_list is None else bwd_list:
        os.environ["FQ_FLASH_CFG"] = json.dumps({**{k_: v_ for k_, v_ in best_fwd.items() if k_ != "tflops"}, **cfg})
        try:
            _, fb = timed(ours, q, k, v)
            out["bwd"].append({**cfg, "fwdbwd_tflops": 3.5 * flops / fb / 1e9})
        except Exception as exc:
            out["bwd"].append({**cfg, "error": str(exc)[:100]})
    del os.environ["FQ_FLASH_CFG"]
    for part in ("fwd", "bwd"):
        for c in out[part]:
            print(part, c)
    return out


def profile(S: int = 8192) -> dict:
    """GPU time of each kernel of one forward + backward at S, from the torch profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    q, k, v = inputs(1, S)
    do = torch.randn_like(q)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    for _ in range(3):
        ours(*leaves).backward(do)
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            ours(*leaves).backward(do)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            out[e.key] = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 5 / 1e3
    for name, t in sorted(out.items(), key=lambda kv: -kv[1]):
        print(f"{t:8.3f} ms  {name[:90]}")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="only try block configs at S=8192")
    p.add_argument("--profile", action="store_true", help="only the time of each kernel at S=8192")
    p.add_argument("--sweep-dkdv", nargs="?", const="", default=None, metavar="M,N,WARPS,STAGES;...",
                   help="only the dK/dV kernel's tiles (DKDV_SWEEP, or the ones given), default forward")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "flash.json"))
    p.add_argument("--seqs", default="2048,8192,32768")
    args = p.parse_args()
    if args.profile or args.sweep or args.sweep_dkdv is not None:
        if args.profile:
            res = profile()
        elif args.sweep_dkdv is not None:
            given = [dict(zip(("bwd_m", "bwd_n", "bwd_warps", "bwd_stages"), map(int, t.split(","))), dq_warps=8,
                          dq_stages=3) for t in args.sweep_dkdv.split(";") if t]
            res = sweep(fwd_list=[{}], bwd_list=given or DKDV_SWEEP)
        else:
            res = sweep()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        return
    rows = []
    for S in (int(s) for s in args.seqs.split(",")):
        q, k, v = inputs(1, S)
        flops = 4 * S * S * HQ * D / 2
        row = {"seq": S}
        f, fb = timed(ours, q, k, v)
        row["ours"] = {"fwd_ms": f, "fwdbwd_ms": fb, "fwd_tflops": flops / f / 1e9, "fwdbwd_tflops": 3.5 * flops / fb / 1e9}
        for name, be in BACKENDS.items():
            try:
                with sdpa_kernel(be):
                    f, fb = timed(sdpa, q, k, v, is_causal=True)
                row[name] = {"fwd_ms": f, "fwdbwd_ms": fb, "fwd_tflops": flops / f / 1e9,
                             "fwdbwd_tflops": 3.5 * flops / fb / 1e9}
            except Exception as exc:  # a backend that cannot run this shape here
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        best = min((row[n]["fwdbwd_ms"] for n in BACKENDS if "fwdbwd_ms" in row[n]), default=float("nan"))
        row["ours_vs_best_sdpa_fwdbwd"] = best / row["ours"]["fwdbwd_ms"]
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    # packed rows: 64 sequences of uneven lengths (mean 256) in one 16384-token row
    g = torch.Generator().manual_seed(0)
    lengths = (torch.rand(64, generator=g) * 448 + 32).long()
    lengths[-1] += 16384 - int(lengths.sum())
    lengths = lengths.clamp(min=1).tolist()
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = inputs(1, T)
    f, fb = timed(ours, q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    Lmax = max(lengths)
    qp, kp, vp = inputs(len(lengths), Lmax)  # padded to the longest, causal (padding past each end is ignored)
    with sdpa_kernel(BACKENDS["flash"]):
        pf, pfb = timed(sdpa, qp, kp, vp, is_causal=True)
    packed = {"tokens": T, "sequences": len(lengths), "max_len": Lmax, "ours_fwd_ms": f, "ours_fwdbwd_ms": fb,
              "sdpa_padded_fwd_ms": pf, "sdpa_padded_fwdbwd_ms": pfb, "speedup_fwdbwd": pfb / fb}
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "rows": rows, "packed": packed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{res['device']}  (TFLOP/s; causal FLOPs counted as half)")
    print(f"{'seq':>6} {'ours fwd':>9} {'ours f+b':>9} " + " ".join(f"{n + ' f+b':>14}" for n in BACKENDS) + "  ratio")
    for r in rows:
        cells = " ".join(f"{r[n].get('fwdbwd_tflops', float('nan')):14.0f}" for n in BACKENDS)
        print(f"{r['seq']:6} {r['ours']['fwd_tflops']:9.0f} {r['ours']['fwdbwd_tflops']:9.0f} {cells}  "
              f"{r['ours_vs_best_sdpa_fwdbwd']:.2f}x")
    print(f"packed {T} tokens / {len(lengths)} seqs: ours {fb:.2f} ms fwd+bwd vs SDPA padded to {Lmax}: "
          f"{pfb:.2f} ms ({pfb / fb:.2f}x)")


if __name__ == "__main__":
    main()
