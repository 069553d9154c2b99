"""RoPE kernel (in place, q and k in one launch) against the reference and transformers."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastqlora.ops import backend
from fastqlora.ops.rope import apply_rope, apply_rope_qk, apply_rope_qkv, apply_rope_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _tables(P, half, device):
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    ang = torch.arange(P, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos().to(device), ang.sin().to(device)


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("B,S,Hq,Hk,D", [(1, 1, 3, 1, 16), (2, 13, 6, 2, 24), (1, 37, 4, 4, 64)], ids=str)
def test_kernel_matches_reference_on_views_of_a_fused_projection(kernel_device, B, S, Hq, Hk, D):
    for dtype in _dtypes(kernel_device):
        g = torch.Generator().manual_seed(S)
        qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, generator=g).to(kernel_device, dtype).requires_grad_(True)
        pos = torch.randint(0, 50, (B, S), generator=g).to(kernel_device)  # restarts, repeats, any order
        cos, sin = _tables(64, D // 2, kernel_device)
        dq = torch.randn(B, S, Hq, D, generator=g).to(kernel_device, dtype)
        dk = torch.randn(B, S, Hk, D, generator=g).to(kernel_device, dtype)

        def split(t):
            t = t * 1  # an intermediate, as a projection output is
            return t[..., : Hq * D].view(B, S, Hq, D), t[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D)

        with backend("triton"):
            q, k = apply_rope(*split(qkv), cos, sin, pos)  # two tensors: one launch each
            fused = apply_rope_qkv(qkv * 1, Hq, Hk, D, cos, sin, pos)  # one tensor: one launch
        assert S == 1 or not q.is_contiguous()  # strided views, rotated in place
        fq, fk = split(fused)
        assert torch.equal(fq, q) and torch.equal(fk, k)
        assert torch.equal(fused[..., (Hq + Hk) * D:], qkv[..., (Hq + Hk) * D:])  # v untouched
        ((q * dq).sum() + (k * dk).sum() + (fq * dq).sum() + (fk * dk).sum()).backward()
        ref_dtype = torch.float64 if dtype == torch.float32 else dtype
        qkv2 = qkv.detach().to(ref_dtype).requires_grad_(True)
        q2, k2 = apply_rope_reference(*split(qkv2), cos.double() if ref_dtype == torch.float64 else cos,
                                      sin.double() if ref_dtype == torch.float64 else sin, pos)
        (2 * (q2 * dq.to(ref_dtype)).sum() + 2 * (k2 * dk.to(ref_dtype)).sum()).backward()
        tol = TOL[dtype]
        assert rel_err(q, q2) < tol and rel_err(k, k2) < tol
        assert rel_err(qkv.grad, qkv2.grad) < tol


@pytest.mark.parametrize("B,S,Hq,Hk,D", [(1, 1, 3, 1, 16), (2, 13, 6, 2, 24), (1, 37, 4, 4, 64)], ids=str)
def test_separate_projection_outputs_in_one_launch(kernel_device, monkeypatch, B, S, Hq, Hk, D):
    """apply_rope_qk (the decoder's path): q [B, S, Hq·D] and k [B, S, Hk·D] rotated together
    in place, one launch forward and one backward, against the reference on the same values."""
    import fastqlora.triton_kernels.rope as kernel

    launches = []
    real = kernel.rope_
    monkeypatch.setattr(kernel, "rope_", lambda *a, **kw: launches.append(kw.get("backward", False)) or real(*a, **kw))
    for dtype in _dtypes(kernel_device):
        launches.clear()
        g = torch.Generator().manual_seed(S + D)
        xq = torch.randn(B, S, Hq * D, generator=g).to(kernel_device, dtype).requires_grad_(True)
        xk = torch.randn(B, S, Hk * D, generator=g).to(kernel_device, dtype).requires_grad_(True)
        pos = torch.randint(0, 50, (B, S), generator=g).to(kernel_device)
        cos, sin = _tables(64, D // 2, kernel_device)
        dq = torch.randn(B, S, Hq, D, generator=g).to(kernel_device, dtype)
        dk = torch.randn(B, S, Hk, D, generator=g).to(kernel_device, dtype)
        with backend("triton"):
            pq, pk = xq * 1, xk * 1  # intermediates, as projection outputs are
            q, k = apply_rope_qk(pq, pk, Hq, Hk, D, cos, sin, pos)
        assert q.data_ptr() == pq.data_ptr() and k.data_ptr() == pk.data_ptr()  # in place
        ((q * dq).sum() + (k * dk).sum()).backward()
        assert launches == [False, True]
        ref_dtype = torch.float64 if dtype == torch.float32 else dtype
        rq, rk = (t.detach().to(ref_dtype).requires_grad_(True) for t in (xq, xk))
        c, s_ = (cos.double(), sin.double()) if ref_dtype == torch.float64 else (cos, sin)
        q2, k2 = apply_rope_reference(rq.view(B, S, Hq, D), rk.view(B, S, Hk, D), c, s_, pos)
        ((q2 * dq.to(ref_dtype)).sum() + (k2 * dk.to(ref_dtype)).sum()).backward()
        tol = TOL[dtype]
        assert rel_err(q, q2) < tol and rel_err(k, k2) < tol
        assert rel_err(xq.grad, rq.grad) < tol and rel_err(xk.grad, rk.grad) < tol
    with pytest.raises(ValueError, match="expected 3 heads"):
        apply_rope_qk(torch.zeros(1, 2, 10), torch.zeros(1, 2, 8), 3, 1, 8, *_tables(4, 4, "cpu"),
                      torch.zeros(1, 2, dtype=torch.long))


def test_matches_transformers_apply_rotary_pos_emb(kernel_device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, S, H, D = 2, 9, 4, 32
    q = torch.randn(B, S, H, D, device=kernel_device)
    k = torch.randn(B, S, 2, D, device=kernel_device)
    cos, sin = _tables(16, D // 2, kernel_device)
    pos = torch.arange(S, device=kernel_device).expand(B, S)
    c = torch.cat([cos[pos], cos[pos]], -1)
    s = torch.cat([sin[pos], sin[pos]], -1)
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
    with backend("triton"):
        q2, k2 = apply_rope(q.clone(), k.clone(), cos, sin, pos)
    assert rel_err(q2, qr.transpose(1, 2)) < 1e-6 and rel_err(k2, kr.transpose(1, 2)) < 1e-6


@pytest.mark.gpu
def test_llama8b_shape_bf16():
    B, S, D = 1, 777, 128
    q = torch.randn(B, S, 32, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, 8, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(2048, D // 2, "cuda")
    pos = torch.arange(S, device="cuda")[None]
    q2, k2 = apply_rope_reference(q, k, cos, sin, pos)
    with backend("triton"):
        q1, k1 = apply_rope(q.clone(), k.clone(), cos, sin, pos)
    assert rel_err(q1, q2) < 1e-2 and rel_err(k1, k2) < 1e-2


@pytest.mark.parametrize("B,S,Hq,Hk,D", [(1, 1, 3, 1, 16), (2, 13, 6, 2, 24), (1, 37, 4, 4, 64)], ids=str)
def test_partial_rotary_in_place_on_a_fused_projection(kernel_device, B, S, Hq, Hk, D):
    """Tables narrower than head_dim / 2 (Phi-4-mini: 3/4 of each head rotates): the kernel
    rotates dimensions i and i + R/2 for i < R/2 and leaves R.. as they were, both ways."""
    R = (3 * D // 4) // 2 * 2
    for dtype in _dtypes(kernel_device):
        g = torch.Generator().manual_seed(S + D)
        qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, generator=g).to(kernel_device, dtype).requires_grad_(True)
        pos = torch.randint(0, 50, (B, S), generator=g).to(kernel_device)
        cos, sin = _tables(64, R // 2, kernel_device)
        with backend("triton"):
            out = apply_rope_qkv(qkv * 1, Hq, Hk, D, cos, sin, pos)
        heads = out[..., : (Hq + Hk) * D].unflatten(-1, (Hq + Hk, D))
        before = qkv.detach()[..., : (Hq + Hk) * D].unflatten(-1, (Hq + Hk, D))
        assert torch.equal(heads[..., R:], before[..., R:])  # the tail passes through
        ref_dtype = torch.float64 if dtype == torch.float32 else dtype
        x = before.to(ref_dtype)
        c = cos.to(ref_dtype)[pos].unsqueeze(2)
        s = sin.to(ref_dtype)[pos].unsqueeze(2)
        x1, x2 = x[..., : R // 2], x[..., R // 2:R]
        want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        assert rel_err(heads[..., :R], want) < TOL[dtype]
        dy = torch.randn(out.shape, generator=g).to(kernel_device, dtype)
        (out * dy).sum().backward()
        # the backward is the rotation by -theta on the rotated share, identity elsewhere
        gh = qkv.grad[..., : (Hq + Hk) * D].unflatten(-1, (Hq + Hk, D)).to(ref_dtype)
        d = dy[..., : (Hq + Hk) * D].unflatten(-1, (Hq + Hk, D)).to(ref_dtype)
        d1, d2 = d[..., : R // 2], d[..., R // 2:R]
        assert rel_err(gh[..., :R], torch.cat([d1 * c + d2 * s, d2 * c - d1 * s], dim=-1)) < TOL[dtype]
        assert torch.equal(qkv.grad[..., : (Hq + Hk) * D].unflatten(-1, (Hq + Hk, D))[..., R:],
                           dy[..., : (Hq + Hk) * D].unflatten(-1, (Hq + Hk, D))[..., R:])


@pytest.mark.parametrize("B,S,Hq,Hk,D", [(1, 1, 3, 1, 16), (2, 3, 6, 2, 24), (3, 5, 4, 4, 12)], ids=str)
def test_rope_into_cache_matches_rope_then_index_copy(kernel_device, monkeypatch, B, S, Hq, Hk, D):
    """Generation's step: one launch rotates q and k and stores the rotated k and v into the KV
    cache at rows row0 + s; against the rotation, then two index copies (the reference path, and
    the same function's own fallback), other cache rows untouched."""
    import fastqlora.triton_kernels.rope as kernels
    from fastqlora.ops import apply_rope_qk_into_cache

    launches = []
    real = kernels.rope_

    def spy(*args, **kwargs):
        launches.append(kwargs.get("cache") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "rope_", spy)

    T, row = 11, 4
    for dtype in _dtypes(kernel_device):
        g = torch.Generator().manual_seed(B * S + D)
        q = torch.randn(B, S, Hq * D, generator=g).to(kernel_device, dtype)
        k = torch.randn(B, S, Hk * D, generator=g).to(kernel_device, dtype)
        v = torch.randn(B, S, 3 * Hk * D, generator=g).to(kernel_device, dtype)[..., Hk * D:2 * Hk * D]
        v = v.unflatten(-1, (Hk, D))  # a strided view, as the projections' outputs are
        keys = torch.randn(B, T, Hk, D, generator=g).to(kernel_device, dtype)
        values = torch.randn(B, T, Hk, D, generator=g).to(kernel_device, dtype)
        pos = torch.randint(0, 40, (B, S), generator=g).to(kernel_device)
        cos, sin = _tables(64, D // 2, kernel_device)
        row0 = torch.tensor([row], device=kernel_device)
        want_q, want_k = apply_rope_reference(q.view(B, S, Hq, D), k.view(B, S, Hk, D), cos, sin, pos)
        want_keys, want_values = keys.clone(), values.clone()
        want_keys[:, row:row + S] = want_k
        want_values[:, row:row + S] = v
        results = []
        for mode in ("triton", "reference"):
            launches.clear()
            with torch.no_grad(), backend(mode):
                qq, kk, ks, vs = q.clone(), k.clone(), keys.clone(), values.clone()
                q4, k4 = apply_rope_qk_into_cache(qq, kk, v, Hq, Hk, D, cos, sin, pos, ks, vs, row0)
            assert launches == ([True] if mode == "triton" else [])  # one launch with the cache, or none
            assert q4.shape == (B, S, Hq, D) and k4.shape == (B, S, Hk, D)
            assert rel_err(q4, want_q) < TOL[dtype] and rel_err(k4, want_k) < TOL[dtype]
            assert rel_err(ks, want_keys) < TOL[dtype] and torch.equal(vs, want_values)
            # rows outside row .. row + S - 1 untouched, bit for bit
            assert torch.equal(ks[:, :row], keys[:, :row]) and torch.equal(ks[:, row + S:], keys[:, row + S:])
            results.append(ks)
        assert rel_err(results[0], results[1]) < TOL[dtype]


def test_rope_into_cache_refuses_a_gradient(kernel_device):
    from fastqlora.ops import apply_rope_qk_into_cache

    q = torch.randn(1, 1, 16, device=kernel_device)
    cache = torch.zeros(1, 4, 1, 16, device=kernel_device)
    cos, sin = _tables(8, 8, kernel_device)
    with pytest.raises(RuntimeError, match="no_grad"):
        apply_rope_qk_into_cache(q, q.clone(), q.view(1, 1, 1, 16), 1, 1, 16, cos, sin,
                                 torch.zeros(1, 1, dtype=torch.long, device=kernel_device), cache, cache.clone(),
                                 torch.zeros(1, dtype=torch.long, device=kernel_device))
