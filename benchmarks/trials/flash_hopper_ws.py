"""Trial, not product code (2026-12-01, H200): Triton 3.6's automatic warp specialization on
Hopper (`tl.range(..., warp_specialize=True)` with num_warps=4 becomes a TMA producer warpgroup
and two consumer warpgroups with setmaxnreg) and TMA tensor descriptors, for the causal flash
forward and dK/dV kernels, against the package's kernels and cuDNN on Llama-3-8B attention shapes.
Result (results/flash_warpspec_trial_h200.json, benchmarks/NOTES.md): slower than the package's
kernels everywhere, and wrong (NaN) at 3 stages; TMA without specialization helped the forward
5-7%. Run: `python benchmarks/trials/flash_hopper_ws.py` on a Hopper GPU (writes $OUT/ws.json).
"""
import json, os, sys, time
import torch, triton
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "..")]
from timing import gpu_ms
import flash_hopper_ws_kernels as fa_ws
from triton_kernels import flash_attention as fa
from torch.nn.attention import SDPBackend, sdpa_kernel

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
out = {}
OUT = os.environ.get("OUT", "/tmp")
Hq, Hk, D = 32, 8, 128
scale = D ** -0.5

def fwd_ws(q, k, v, cu, maxlen, bm, bn, st, ws, mode, warps):
    T = q.shape[0]
    o = torch.empty_like(q); lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(maxlen, bm), cu.numel() - 1, Hq)
    fa_ws.fwd_ws[grid](q, k, v, o, lse, cu, scale, T, Hq, Hk, Hq // Hk, lse.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                       HEAD_DIM=D, WS=ws, MODE=mode, num_warps=warps, num_stages=st)
    return o, lse

def dkdv_ws(q, k, v, do, lse, delta, cu, maxlen, bm, bn, st, ws, warps):
    T = q.shape[0]
    dk = torch.empty_like(k); dv = torch.empty_like(v)
    grid = (triton.cdiv(maxlen, bn), cu.numel() - 1, Hk)
    fa_ws.dkdv_ws[grid](q, k, v, do, dk, dv, lse, delta, cu, scale, T, Hq, Hk, Hq // Hk, lse.stride(0), BLOCK_M=bm,
                        BLOCK_N=bn, HEAD_DIM=D, WS=ws, num_warps=warps, num_stages=st)
    return dk, dv

def cur_dkdv(q, k, v, do, lse, delta, cu, maxlen):
    cfg = fa._config(D, q.device)
    dk = torch.empty_like(k); dv = torch.empty_like(v)
    fa._attn_bwd_dkdv[(triton.cdiv(maxlen, cfg["bwd_n"]), cu.numel() - 1, Hk)](
        q, k, v, do, dk, dv, lse, delta, cu, scale, 1.0, 0, Hq // Hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        BLOCK_M=cfg["bwd_m"], BLOCK_N=cfg["bwd_n"], SPLIT=True, num_warps=cfg["bwd_warps"],
        num_stages=cfg["bwd_stages"], CAUSAL=True, HAS_WINDOW=False, HAS_CAP=False, HEAD_DIM=D, PRECISION="tf32")
    return dk, dv

def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

FWD = [(128, 64, 2, True, 1, 4), (128, 64, 3, True, 1, 4), (128, 128, 2, True, 1, 4), (128, 64, 3, False, 0, 8)]
DKDV = [(64, 128, 2, True, 4), (64, 128, 3, True, 4), (64, 128, 1, True, 4), (32, 128, 2, True, 4), (64, 128, 1, False, 8)]

def run(S, lens=None, time_it=True):
    torch.manual_seed(0)
    if lens is None:
        lens = [S]
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    maxlen = max(lens)
    q = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16)
    o_ref, lse_ref = fa.flash_attn_forward(q, k, v, cu, maxlen, scale, True, None, None)
    delta = (o_ref.float() * do.float()).sum(-1).transpose(0, 1).contiguous()
    dk_ref, dv_ref = cur_dkdv(q, k, v, do, lse_ref, delta, cu, maxlen)
    res = {"lens": lens[:8], "fwd": {}, "dkdv": {}}
    flops_fwd = sum(2 * 2 * l * l / 2 * D * Hq for l in lens)  # causal half, 2 matmuls
    flops_dkdv = 2 * flops_fwd
    if time_it:
        res["fwd"]["current"] = gpu_ms(lambda: fa.flash_attn_forward(q, k, v, cu, maxlen, scale, True, None, None))
        res["dkdv"]["current"] = gpu_ms(lambda: cur_dkdv(q, k, v, do, lse_ref, delta, cu, maxlen))
        if len(lens) == 1:
            qq = q.view(1, S, Hq, D).transpose(1, 2); kk = k.view(1, S, Hk, D).transpose(1, 2); vv = v.view(1, S, Hk, D).transpose(1, 2)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                res["fwd"]["cudnn"] = gpu_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
    for c in FWD:
        name = "fwd %dx%d s%d ws%d m%d w%d" % (c[0], c[1], c[2], c[3], c[4], c[5])
        try:
            o, lse = fwd_ws(q, k, v, cu, maxlen, *c)
            err = (rel(o, o_ref), rel(lse, lse_ref))
            t = gpu_ms(lambda: fwd_ws(q, k, v, cu, maxlen, *c)) if time_it else None
            res["fwd"][name] = {"err": err, "ms": t}
        except Exception as e:
            res["fwd"][name] = {"error": repr(e)[-500:]}
    for c in DKDV:
        name = "dkdv %dx%d s%d ws%d w%d" % c
        try:
            dk, dv = dkdv_ws(q, k, v, do, lse_ref, delta, cu, maxlen, *c)
            err = (rel(dk, dk_ref), rel(dv, dv_ref))
            t = gpu_ms(lambda: dkdv_ws(q, k, v, do, lse_ref, delta, cu, maxlen, *c)) if time_it else None
            res["dkdv"][name] = {"err": err, "ms": t}
        except Exception as e:
            res["dkdv"][name] = {"error": repr(e)[-500:]}
    if time_it:
        for part, fl in (("fwd", flops_fwd), ("dkdv", flops_dkdv)):
            for kname, v_ in res[part].items():
                t = v_ if isinstance(v_, float) else v_.get("ms")
                if t:
                    print(f"S={S} {part:5s} {kname:28s} {t:.3f} ms {fl / t / 1e9:.0f} TFLOP/s {'' if isinstance(v_, float) else v_['err']}")
    else:
        print(S, lens[:5], json.dumps(res)[:3000])
    return res

t0 = time.time()
out["packed"] = run(0, lens=[777, 2049, 1, 17, 3000], time_it=False)
for S in (8192, 2048, 32768):
    out[str(S)] = run(S)
    json.dump(out, open(os.path.join(OUT, "ws.json"), "w"), indent=1)
print("seconds", time.time() - t0)
