"""The fused NF4 matmul kernels against bitsandbytes-exact dequantization + float64 matmul.

On CPU the kernels run under TRITON_INTERPRET=1 in fp32 (ieee dots) on scaled-down
shapes; on the GPU every configuration of the tuning tables runs in bf16 on Llama-3-8B's
projection shapes, since the tuner would silently skip a broken one.
"""
from __future__ import annotations

import pytest
import torch

import _nf4_helpers as nf4h

from fastqlora.ops import nf4_dispatch
from fastqlora.ops.nf4_linear import frozen_matmul, frozen_matmul_t
from fastqlora.quant import dequantize_nf4_reference

MatmulConfig = pytest.importorskip("fastqlora.triton_kernels.nf4_configs").MatmulConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in result"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(M, N, K, r, device, dtype, seed=0, bias=True, n_extra=()):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ws = [nf4h.quantize((rnd(n, K) * 0.05).to(device)) for n in (N, *n_extra)]
    x = rnd(M, K).to(device, dtype)
    a = [rnd(r, K).to(device, dtype) * 0.1 for _ in ws]
    b = [rnd(w.shape[0], r).to(device, dtype) * 0.1 for w in ws]
    bs = [rnd(w.shape[0]).to(device, dtype) if bias else None for w in ws]
    return ws, x, a, b, bs


# ---------------------------------------------------------------- CPU: the oracle itself
def test_dequantize_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 320)
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    want = bnbf.dequantize_4bit(packed, qs)
    t = nf4h.from_bnb(packed, qs)
    assert torch.equal(nf4h.dequantize_oracle(t, torch.float32), want)
    assert torch.equal(dequantize_nf4_reference(t, torch.float32), want)


# ---------------------------------------------------------------- the in-kernel tile decode
try:
    import triton
    import triton.language as tl

    from fastqlora.triton_kernels.nf4_tile import nf4_tile

    @triton.jit
    def _decode_kernel(w_ptr, am_ptr, nam_ptr, ncode_ptr, code_ptr, off, out_ptr, K,
                       BR: tl.constexpr, BC: tl.constexpr, DQ: tl.constexpr, ASM: tl.constexpr,
                       LUT: tl.constexpr):
        """Writes nf4_tile's [BR, BC] tiles out, so the decode itself can be compared."""
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c0 = tl.program_id(1) * BC
        w_ptrs = w_ptr + r[:, None] * (K // 2) + (c0 // 2 + tl.arange(0, BC // 2))[None, :]
        blk = r[:, None] * (K // 64) + (c0 // 64 + tl.arange(0, BC // 64))[None, :]
        t = nf4_tile(w_ptrs, blk, am_ptr, nam_ptr, ncode_ptr, code_ptr, off, BR, BC, DQ, 256,
                     out_ptr.dtype.element_ty, ASM, LUT)
        tl.store(out_ptr + r[:, None] * K + (c0 + tl.arange(0, BC))[None, :], t)
except ImportError:  # no Triton: the kernel tests skip through kernel_device
    _decode_kernel = None


def _decode(t, dtype, BR, BC, asm, lut=0):
    N, K = t.shape
    out = torch.empty(N, K, device=t.packed.device, dtype=dtype)
    nested = t.nested_absmax if t.nested_absmax is not None else t.absmax
    ncode = t.nested_code if t.nested_code is not None else t.code
    _decode_kernel[(N // BR, K // BC)](t.packed, t.absmax, nested, ncode, t.code, float(t.nested_offset or 0.0),
                                       out, K, BR=BR, BC=BC, DQ=t.absmax.dtype == torch.uint8, ASM=asm,
                                       LUT=lut, num_warps=4)
    return out


@pytest.mark.parametrize("BC", [64, 128])
def test_tile_decode_portable_exact(kernel_device, BC):
    """The portable decode (interpreter / fp32) equals the oracle bit for bit."""
    g = torch.Generator().manual_seed(BC)
    t = nf4h.quantize((torch.randn(96, 3 * BC, generator=g) * 0.05).to(kernel_device))
    assert torch.equal(_decode(t, torch.float32, 32, BC, kernel_device == "cuda"), nf4h.dequantize_oracle(t, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("BR,BC", [(32, 64), (64, 128), (16, 256)])
@pytest.mark.parametrize("table", ["memory", "registers"])
def test_gpu_tile_decode_ptx_bit_exact(dtype, BR, BC, table):
    """Both inline-PTX decodes (code table read from memory; per-block table in
    registers) write exactly what bitsandbytes' dequantize writes; the tiles give a
    thread 8, 32 and 16 bytes."""
    from fastqlora.triton_kernels.nf4_tile import lut_pack

    bnbf = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator(device="cuda").manual_seed(BR + BC)
    w = torch.randn(192, 5 * BC, device="cuda", generator=g, dtype=dtype) * 0.03
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    lut = lut_pack(BR, BC, 4) if table == "registers" else 0
    assert table == "memory" or lut == 8
    got = _decode(nf4h.from_bnb(packed, qs), dtype, BR, BC, True, lut)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, qs))


# ---------------------------------------------------------------- kernels, interpreter or GPU
FWD_CFGS = [
    MatmulConfig(32, 64, 64, 4, 1, False, 4, 1),
    MatmulConfig(32, 64, 64, 4, 1, True, 4, 1),
    MatmulConfig(16, 64, 64, 1, 3, True, 4, 1),  # split-K: partials summed by the tile's last program
]


@pytest.mark.parametrize("M,cfg", [(1, FWD_CFGS[2]), (17, FWD_CFGS[1]), (333, FWD_CFGS[0]), (17, FWD_CFGS[2])])
def test_forward_kernel_fp32(kernel_device, M, cfg):
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd

    K, N, r, s = 192, 320, 8, 0.75
    (w,), x, (a,), (b,), (bias,) = _case(M, N, K, r, kernel_device, torch.float32, seed=M)
    xa = x @ a.t()
    (y,) = nf4_matmul_fwd(x, [w], cfg, xa=xa, lora_b=[b], scales=[s], biases=[bias])
    wd = nf4h.dequantize_oracle(w, torch.float64)
    ref = x.double() @ wd.t() + s * (xa.double() @ b.double().t()) + bias.double()
    assert y.dtype == x.dtype and y.shape == (M, N)
    assert rel(y, ref) < 1e-5


def test_kernels_refuse_a_tile_that_does_not_divide_k(kernel_device):
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd
    from fastqlora.triton_kernels.nf4_matmul_t import nf4_matmul_t

    (w,), x, _, _, _ = _case(3, 64, 192, 4, kernel_device, torch.float32, seed=2, bias=False)
    with pytest.raises(ValueError, match="bk = 128"):
        nf4_matmul_fwd(x, [w], MatmulConfig(16, 64, 128, 1, 1, False, 4, 1))
    with pytest.raises(ValueError, match="bk = 128"):
        nf4_matmul_t([torch.zeros(3, 64, device=kernel_device)], [w], MatmulConfig(16, 64, 128, 1, 1, False, 4, 1))


def test_split_k_repeatable(kernel_device):
    """Split-K launches leave their tile counters at zero: back-to-back launches (and a
    different grid in between) give the same, correct, bit-identical results."""
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd

    K, N = 256, 192
    (w,), x, _, _, _ = _case(5, N, K, 4, kernel_device, torch.float32, seed=11, bias=False)
    ref = x.double() @ nf4h.dequantize_oracle(w, torch.float64).t()
    cfg = MatmulConfig(16, 64, 64, 1, 4, False, 4, 1)
    first = nf4_matmul_fwd(x, [w], cfg)[0]
    nf4_matmul_fwd(x[:3], [w], MatmulConfig(16, 32, 64, 1, 2, False, 4, 1))
    again = nf4_matmul_fwd(x, [w], cfg)[0]
    assert rel(first, ref) < 1e-5 and torch.equal(first, again)


def test_forward_kernel_three_weights_fp16(kernel_device):
    """q, k, v in one launch; N = 320, 64, 100 (the last not a multiple of the tile)."""
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd

    M, K, r = 33, 128, 4
    ws, x, a, b, bs = _case(M, 320, K, r, kernel_device, torch.float16, seed=3, n_extra=(64, 100))
    xa = torch.cat([x @ ai.t() for ai in a], 1)
    scales = [0.5, 1.0, 2.0]
    for cfg in (FWD_CFGS[0], FWD_CFGS[2]):
        ys = nf4_matmul_fwd(x, ws, cfg, xa=xa, lora_b=b, scales=scales, xa_cols=[0, r, 2 * r], biases=bs)
        for i, (w, y) in enumerate(zip(ws, ys)):
            wd = nf4h.dequantize_oracle(w, torch.float64)
            ref = (x.double() @ wd.t() + scales[i] * (xa[:, i * r:(i + 1) * r].double() @ b[i].double().t())
                   + bs[i].double())
            assert rel(y, ref) < 2e-3, (i, cfg)


@pytest.mark.parametrize("M,nseg,cfg", [
    (1, 1, MatmulConfig(16, 64, 64, 4, 1, True, 4, 1)),
    (17, 2, MatmulConfig(32, 64, 64, 4, 1, False, 4, 1)),
    (333, 1, MatmulConfig(32, 64, 64, 4, 1, True, 4, 1)),
])
def test_transposed_kernel_fp32(kernel_device, M, nseg, cfg):
    from fastqlora.triton_kernels.nf4_matmul_t import nf4_matmul_t

    K, r = 192, 8
    ws, _, a, _, _ = _case(M, 320, K, r, kernel_device, torch.float32, seed=M, n_extra=(100,)[: nseg - 1])
    g = torch.Generator().manual_seed(M + 1)
    dys = [torch.randn(M, w.shape[0], generator=g).to(kernel_device) for w in ws]
    p = torch.randn(M, r * nseg, generator=g).to(kernel_device)
    a_cat = torch.cat(a)
    dx = nf4_matmul_t(dys, ws, cfg, p=p, a_cat=a_cat)
    ref = sum(d.double() @ nf4h.dequantize_oracle(w, torch.float64) for d, w in zip(dys, ws))
    ref = ref + p.double() @ a_cat.double()
    assert dx.shape == (M, K) and rel(dx, ref) < 1e-5


def test_dispatch_interpreter_matches_plain(kernel_device):
    """frozen_matmul / frozen_matmul_t: fused path (here) equals the plain dequantize path."""
    from fastqlora.ops import backend

    M, K, r = 9, 128, 4
    ws, x, a, b, bs = _case(M, 192, K, r, kernel_device, torch.float32, seed=5, n_extra=(64,))
    xa = torch.cat([x @ ai.t() for ai in a], 1)
    kw = dict(xa=xa, lora_b=b, scales=[0.5, 2.0], biases=bs, xa_cols=[0, r])
    with backend("triton"):
        fused = frozen_matmul(x, ws, **kw)
        dx_f = frozen_matmul_t(fused, ws, p=xa, a_cat=torch.cat(a))
    with backend("reference"):
        plain = frozen_matmul(x, ws, **kw)
        dx_p = frozen_matmul_t(plain, ws, p=xa, a_cat=torch.cat(a))
    for yf, yp in zip(fused, plain):
        assert rel(yf, yp) < 1e-5
    assert rel(dx_f, dx_p) < 1e-5


# ---------------------------------------------------------------- GPU: real shapes, bf16
LLAMA8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K)


def _bnb_weight(N, K, seed):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64, quant_storage=torch.uint8)
    t = nf4h.from_bnb(packed, qs)
    return t, bnbf.dequantize_4bit(packed, qs).float()


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", LLAMA8B)
def test_gpu_every_config_bf16(N, K):
    """Every tuning-table config for this GPU (decode and prefill lists) on real shapes."""
    from fastqlora.ops.nf4_gemv_cuda import nf4_gemv_cuda
    from fastqlora.triton_kernels import nf4_configs
    from fastqlora.triton_kernels.nf4_gemv import nf4_gemv
    from fastqlora.triton_kernels.nf4_matmul import nf4_matmul_fwd
    from fastqlora.triton_kernels.nf4_matmul_t import nf4_matmul_t

    w, wd = _bnb_weight(N, K, seed=N + K)
    r, s = 16, 2.0
    props = torch.cuda.get_device_properties(0)
    cap = (props.major, props.minor)
    for M in (1, 17, 333):
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        a = torch.randn(r, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        b = torch.randn(N, r, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
        xa = x @ a.t()
        ref = x.float() @ wd.t() + s * (xa.float() @ b.float().t())
        p = (dy @ b) * s
        ref_t = dy.float() @ wd + p.float() @ a.float()
        fwd = set(nf4_configs.forward_candidates(cap, M, N, K))
        fwd |= set(nf4_configs.forward_candidates(cap, 4096, N, K))  # prefill tiles on odd M too
        for cfg in sorted(fwd, key=str):
            (y,) = nf4_matmul_fwd(x, [w], cfg, xa=xa, lora_b=[b], scales=[s])
            assert rel(y, ref) < 1e-2, (M, cfg)
        for cfg in nf4_configs.gemv_candidates(M, N, K, cuda=M == 1):
            y = (nf4_gemv_cuda if cfg.cuda else nf4_gemv)(x, w, cfg, xa=xa, lora_b=b, scale=s)
            assert rel(y, ref) < 1e-2, (M, cfg)
        tcfg = set(nf4_configs.transposed_candidates(cap, M, K))
        tcfg |= set(nf4_configs.transposed_candidates(cap, 4096, K))
        for cfg in sorted(tcfg, key=str):
            dx = nf4_matmul_t([dy], [w], cfg, p=p, a_cat=a)
            assert rel(dx, ref_t) < 1e-2, (M, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 17, 333, 4096])
def test_gpu_dispatch_bf16(M):
    """Whatever the tuner picks (fused or dequantize + cuBLAS) gives the right answer."""
    nf4_dispatch.clear()
    N, K, r = 4096, 4096, 16
    w, wd = _bnb_weight(N, K, seed=7)
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    a = torch.randn(r, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    b = torch.randn(N, r, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    xa = x @ a.t()
    (y,) = frozen_matmul(x, [w], xa=xa, lora_b=[b], scales=[0.5])
    assert rel(y, x.float() @ wd.t() + 0.5 * (xa.float() @ b.float().t())) < 1e-2
    dx = frozen_matmul_t([y], [w])
    assert rel(dx, y.float() @ wd) < 1e-2
    assert len(nf4_dispatch.choices()) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("N,K,r", [(1000, 4160, 16), (37, 64, 40), (4097, 14336, 8)])
@pytest.mark.parametrize("M", [1, 2])
def test_gpu_cuda_gemv_odd_shapes(M, dtype, nested, N, K, r):
    """The extension's one- and two-row kernels (csrc/nf4_gemv.cu), every config: rows past N
    in the last warp, K not a multiple of 1024 (lanes past the row's end), LoRA ranks above 32,
    bias, plain and double-quantized absmax, against the fp64 oracle; run twice, equal. Each
    row of a two-row product is bit for bit the one-row kernel's on that row (same config:
    the same sums in the same order)."""
    from fastqlora.ops.nf4_gemv_cuda import available, nf4_gemv_cuda
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels import nf4_configs
    from fastqlora.triton_kernels.nf4_configs import GemvConfig

    g = torch.Generator().manual_seed(N + K + r)
    w = NF4Tensor.quantize((torch.randn(N, K, generator=g) * 0.05).cuda(), blocksize=64, compress_statistics=nested)
    assert (w.absmax.dtype == torch.uint8) == nested
    x = torch.randn(M, K, generator=g).to("cuda", dtype)
    xa = (torch.randn(M, r, generator=g) * 0.5).to("cuda", dtype)
    b = (torch.randn(N, r, generator=g) * 0.1).to("cuda", dtype)
    bias = torch.randn(N, generator=g).to("cuda", dtype)
    wd = nf4h.dequantize_oracle(w, torch.float64)
    ref = x.double() @ wd.t() + 1.5 * (xa.double() @ b.double().t()) + bias.double()
    ref_plain = x.double() @ wd.t()
    assert available(x, w)
    cfgs = [c for c in nf4_configs.gemv_candidates(M, N, K, cuda=True) if c.cuda]
    assert cfgs
    # every kernel the extension has for M rows, listed in the table or not
    kernels = ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2), (2, 4), (4, 4), (8, 4))
    cfgs += [GemvConfig(rw, sk, 8, cuda=True) for rw, sk in kernels if M == 1 or rw > 1]
    for cfg in cfgs:
        y = nf4_gemv_cuda(x, w, cfg, xa=xa, lora_b=b, scale=1.5, bias=bias)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel(y, ref) < 5e-3, cfg
        assert torch.equal(nf4_gemv_cuda(x, w, cfg, xa=xa, lora_b=b, scale=1.5, bias=bias), y)
        assert rel(nf4_gemv_cuda(x, w, cfg), ref_plain) < 5e-3, cfg
        if M == 2:
            for m in range(M):
                one = nf4_gemv_cuda(x[m:m + 1], w, cfg, xa=xa[m:m + 1], lora_b=b, scale=1.5, bias=bias)
                assert torch.equal(one[0], y[m]), (cfg, m)


def test_gemv_candidates_by_rows():
    """The gemv's configs by rows of x: the Triton gemv's (and the CUDA gemv's first, when it
    can take the product) at one row; only the CUDA two-row kernels (never one weight row a
    warp, which the extension has no two-row kernel for) at two; none at three. CPU only."""
    from fastqlora.triton_kernels import nf4_configs

    one = nf4_configs.gemv_candidates(1, 4096, 4096, cuda=True)
    assert one[0].cuda and any(not c.cuda for c in one)
    assert all(not c.cuda for c in nf4_configs.gemv_candidates(1, 4096, 4096, cuda=False))
    two = nf4_configs.gemv_candidates(2, 4096, 4096, cuda=True)
    assert two and all(c.cuda and c.bn in (2, 4, 8) and c.split_k in (1, 2, 4) for c in two)
    assert nf4_configs.gemv_candidates(2, 4096, 4096, cuda=False) == []
    assert nf4_configs.gemv_candidates(3, 4096, 4096, cuda=True) == []


def test_decode_mma_shares_launch_only_what_one_launch_can_take():
    """Several weights of one x share a launch only when the kernel can take them together:
    2-3 weights, one K, all nested or all plain, no K split over the grid."""
    from types import SimpleNamespace

    from fastqlora.ops.nf4_decode_mma import shares_launch
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    def w(n, k, nested=True):
        return SimpleNamespace(shape=(n, k), nested=nested)

    cfg = DecodeMmaConfig(4, 1, cols=True)
    assert shares_launch([w(4096, 4096), w(1024, 4096), w(1024, 4096)], cfg)
    assert shares_launch([w(14336, 4096), w(14336, 4096)], DecodeMmaConfig(0, cols=True, groups=14))
    assert not shares_launch([w(4096, 4096)], cfg)  # one weight: the plain launch
    assert not shares_launch([w(64, 4096)] * 4, cfg)  # more than the kernel's three parts
    assert not shares_launch([w(64, 4096), w(64, 4160)], cfg)
    assert not shares_launch([w(64, 4096), w(64, 4096, nested=False)], cfg)
    assert not shares_launch([w(64, 4096), w(64, 4096)], DecodeMmaConfig(4, 2))


def test_per_weight_lists_must_match_the_weights():
    """A per-weight list shorter than the weights is refused (a zip would drop outputs), before
    anything touches a device."""
    from types import SimpleNamespace

    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma_many
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    ws = [SimpleNamespace(shape=(64, 4096), nested=True)] * 3
    x = torch.zeros(1, 4096)
    with pytest.raises(ValueError, match="lora_bs has 1 entries for 3 weights"):
        nf4_decode_mma_many(x, ws, DecodeMmaConfig(4, 1, cols=True), lora_bs=[None])
    with pytest.raises(ValueError, match="scales has 2 entries for 3 weights"):
        frozen_matmul(x, ws, scales=[1.0, 1.0])


def test_shared_launch_switch(monkeypatch):
    """FASTQLORA_DECODE_SHARED_LAUNCH=0 runs weights that could share a launch one launch each
    (the generation benchmark's A/B); unset, they share it; another value is refused by name.
    The launches are recorded instead of run (CPU)."""
    from types import SimpleNamespace

    from fastqlora.ops import nf4_decode_mma as mod
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    launches = []
    monkeypatch.setattr(mod, "nf4_decode_mma", lambda x, w, cfg, **kw: launches.append([w]) or w)
    monkeypatch.setattr(mod, "_check", lambda *a: None)
    monkeypatch.setattr(mod, "_part", lambda x, w, *a: ((w,), w))
    monkeypatch.setattr(mod, "_launch", lambda x, parts, cfg, stride: launches.append([p[0] for p in parts]))
    ws = [SimpleNamespace(shape=(n, 4096), nested=True) for n in (4096, 1024, 1024)]
    x, cfg = torch.zeros(1, 4096), DecodeMmaConfig(4, 1, cols=True)
    monkeypatch.delenv("FASTQLORA_DECODE_SHARED_LAUNCH", raising=False)
    assert mod.nf4_decode_mma_many(x, ws, cfg) == ws and launches == [ws]
    launches.clear()
    monkeypatch.setenv("FASTQLORA_DECODE_SHARED_LAUNCH", "0")
    assert mod.nf4_decode_mma_many(x, ws, cfg) == ws and launches == [[w] for w in ws]
    monkeypatch.setenv("FASTQLORA_DECODE_SHARED_LAUNCH", "yes")
    with pytest.raises(ValueError, match="FASTQLORA_DECODE_SHARED_LAUNCH='yes'"):
        mod.nf4_decode_mma_many(x, ws, cfg)


def test_decode_mma_candidates_by_rows():
    """The tensor-core decode's configs by rows of x: the column layout's only at one row,
    both layouts at two, the row layout's from three to 16, none above or without the
    extension's CUDA. CPU only."""
    from fastqlora.triton_kernels import nf4_configs

    one, two = (nf4_configs.decode_mma_candidates(m, cuda=True) for m in (1, 2))
    assert one and all(c.cols for c in one)
    assert {c for c in two if c.cols} == set(one) and any(not c.cols for c in two)
    for m in (3, 16):
        cands = nf4_configs.decode_mma_candidates(m, cuda=True)
        assert cands and not any(c.cols for c in cands)
    assert nf4_configs.decode_mma_candidates(17, cuda=True) == []
    assert nf4_configs.decode_mma_candidates(1, cuda=False) == []
    assert nf4_configs.DecodeMmaConfig(8, 2, cols=True).short() == "cuda mma s8 kb2 cols"
    # with the weight's rows and the SMs: first the 16-warp blocks of ceil(groups / SMs) groups
    for m in (1, 2):
        cands = nf4_configs.decode_mma_candidates(m, cuda=True, n=14336, sms=132)
        assert cands[0] == nf4_configs.DecodeMmaConfig(0, cols=True, groups=7) and cands[1:] == (one if m == 1 else two)
    three = nf4_configs.decode_mma_candidates(3, cuda=True)
    assert nf4_configs.decode_mma_candidates(3, cuda=True, n=14336, sms=132) == three
    assert [nf4_configs.flat_groups(n, 132) for n in (4096, 1024, 4097, 16 * 7 * 132, 16 * 16 * 132 * 3, 1)] == [
        2, 1, 2, 7, 16, 1]
    assert nf4_configs.DecodeMmaConfig(0, cols=True, groups=7).short() == "cuda mma g7 cols"
    assert nf4_configs.DecodeMmaConfig(8, cols=True, rows=8).short() == "cuda mma s8 cols r8"


@pytest.mark.gpu
def test_gpu_cuda_gemv_refuses_bad_input():
    from fastqlora.ops.nf4_gemv_cuda import available, nf4_gemv_cuda
    from fastqlora.triton_kernels.nf4_configs import GemvConfig

    w = nf4h.quantize(torch.randn(64, 128, device="cuda") * 0.05)
    x = torch.randn(1, 129, device="cuda", dtype=torch.bfloat16)[:, 1:]  # 2-byte offset: not 16-byte aligned
    assert not available(x, w)
    with pytest.raises(ValueError, match="aligned"):
        nf4_gemv_cuda(x, w, GemvConfig(4, 1, 8, cuda=True))
    with pytest.raises(ValueError, match="K = 64"):
        nf4_gemv_cuda(torch.randn(1, 64, device="cuda", dtype=torch.bfloat16), w, GemvConfig(4, 1, 8, cuda=True))
    assert not available(torch.randn(1, 128, device="cuda"), w)  # fp32 x: the Triton gemv's
    x_ok = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K split"):
        nf4_gemv_cuda(x_ok, w, GemvConfig(4, 3, 8, cuda=True))
    with pytest.raises(ValueError, match="no kernel"):
        nf4_gemv_cuda(x_ok, w, GemvConfig(3, 1, 8, cuda=True))
    x_two = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    assert available(x_two, w) and not available(torch.randn(3, 128, device="cuda", dtype=torch.bfloat16), w)
    assert not available(torch.randn(128, 2, device="cuda", dtype=torch.bfloat16).t(), w)  # not contiguous
    with pytest.raises(ValueError, match="no kernel for 2 rows of x, 1 weight rows"):
        nf4_gemv_cuda(x_two, w, GemvConfig(1, 1, 8, cuda=True))
    with pytest.raises(ValueError, match="xa must be"):
        nf4_gemv_cuda(x_two, w, GemvConfig(2, 1, 8, cuda=True), xa=torch.zeros(1, 4, device="cuda", dtype=torch.bfloat16),
                      lora_b=torch.zeros(64, 4, device="cuda", dtype=torch.bfloat16))


def test_cuda_gemv_refuses_what_it_cannot_take():
    """A CPU row (or any product the CUDA gemv cannot take) is refused with what it needs,
    before touching the extension; runs without a GPU."""
    from fastqlora.ops.nf4_gemv_cuda import available, nf4_gemv_cuda
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels.nf4_configs import GemvConfig

    w = NF4Tensor.quantize(torch.randn(64, 128) * 0.05, blocksize=64, compress_statistics=True)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    assert not available(x, w)
    with pytest.raises(ValueError, match="CUDA row.*under 2 GiB.*got x \\(1, 128\\) torch.bfloat16 on cpu"):
        nf4_gemv_cuda(x, w, GemvConfig(4, 1, 8, cuda=True))


@pytest.mark.parametrize("change,match", [
    (dict(K=96), "multiple of 64"), (dict(warps=9), "warps per block"), (dict(split=3), "K split"),
    (dict(x=4104), "16-byte aligned"), (dict(blocksize2=200), "power of two"),
    (dict(N=2**25), "under 2 GiB"), (dict(rows=3), "no kernel"), (dict(rows=1, split=2), "no kernel"), (dict(dtype=0), "float16 or bfloat16"),
    (dict(M=3), "1 or 2 rows"), (dict(M=0), "1 or 2 rows"), (dict(M=2, rows=1, split=1), "no kernel for 2 rows of x"),
])
def test_cuda_gemv_binding_checks_before_launch(change, match):
    """The extension's one-row kernel refuses a bad shape or config before touching memory
    or the GPU (so this runs without one), naming what is wrong; the arguments in the order
    ops/nf4_gemv_cuda.py passes them."""
    from fastqlora._ext import built_with_cuda, ext

    if not built_with_cuda():
        pytest.skip("the extension was built without CUDA")
    args = dict(x=4096, M=1, K=128, packed=8192, code=0, absmax=0, qabsmax=16, code2=0, absmax2=0, offset=0.0,
                blocksize2=256, N=8, xa=0, lora_b=0, rank=0, scale=1.0, bias=0, y=0, dtype=2, rows=4, warps=8,
                split=2, stream=0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ext().nf4_gemv_cuda(*args.values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("N,K,r", [(1000, 4160, 16), (37, 64, 40), (4097, 14336, 8), (333, 4096, 16)])
def test_gpu_decode_mma_odd_shapes(dtype, nested, N, K, r):
    """The extension's tensor-core decode (csrc/nf4_decode_mma.cu), every split it has and
    the grid's K splits of the table and more: M from 1 to 16 (one and two x tiles), rows
    past N in the last warp, K not a multiple of 256 (the unvectorized absmax loads) and of
    the grid split, xa a column slice of a wider matrix, LoRA rank above 32, bias, plain and
    double-quantized absmax, against the fp64 oracle; run twice, equal (the partials are
    summed in a fixed order)."""
    from fastqlora.ops.nf4_decode_mma import available, nf4_decode_mma
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels import nf4_configs
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    g = torch.Generator().manual_seed(N + K + r)
    w = NF4Tensor.quantize((torch.randn(N, K, generator=g) * 0.05).cuda(), blocksize=64, compress_statistics=nested)
    wd = nf4h.dequantize_oracle(w, torch.float64)
    b = (torch.randn(N, r, generator=g) * 0.1).to("cuda", dtype)
    bias = torch.randn(N, generator=g).to("cuda", dtype)
    cfgs = set(nf4_configs.decode_mma_candidates(16, cuda=True))
    assert cfgs and not any(c.cols for c in cfgs)
    cfgs |= {DecodeMmaConfig(s, kb) for s in (2, 4, 8) for kb in (1, 3, 7)}
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
    for M in (1, 3, 5, 8, 9, 12, 16):
        x = torch.randn(M, K, generator=g).to("cuda", dtype)
        xa_wide = (torch.randn(M, r + 5, generator=g) * 0.5).to("cuda", dtype)
        xa = xa_wide[:, 3:3 + r]
        ref = x.double() @ wd.t() + 1.5 * (xa.double() @ b.double().t()) + bias.double()
        ref_plain = x.double() @ wd.t()
        assert available(x, w)
        for cfg in sorted(cfgs, key=str):
            y = nf4_decode_mma(x, w, cfg, xa=xa, lora_b=b, scale=1.5, bias=bias)
            assert y.shape == (M, N) and y.dtype == dtype
            assert rel(y, ref) < tol, (M, cfg)
            assert torch.equal(nf4_decode_mma(x, w, cfg, xa=xa, lora_b=b, scale=1.5, bias=bias), y)
            assert rel(nf4_decode_mma(x, w, cfg), ref_plain) < tol, (M, cfg)
    # Up to 4 rows the kernel zero-fills the missing rows of x, above it loads every lane's
    # row; each output column depends on its own row of x only, so the first rows agree bit
    # for bit across the two (and with the two-tile kernel above 8 rows).
    x16 = torch.randn(16, K, generator=g).to("cuda", dtype)
    for cfg in sorted(cfgs, key=str):
        y16 = nf4_decode_mma(x16, w, cfg)
        for m in (3, 4, 5, 8):
            assert torch.equal(nf4_decode_mma(x16[:m].contiguous(), w, cfg), y16[:m]), (m, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("N,K,r", [(1000, 4160, 16), (37, 64, 40), (4097, 14336, 8), (333, 4096, 16), (48, 256, 16)])
def test_gpu_decode_mma_cols(dtype, nested, N, K, r):
    """The tensor-core decode's column layout (one or two rows of x; each absmax block of a
    step in its own columns of B): every in-block split and grid splits of 1, 3 and 7 blocks,
    16-warp blocks of 1-16 row groups, 8 weight rows a warp,
    rows past N, K not a multiple of 256 (a partial last step, the clamped loads) and K = 64
    (one block), LoRA rank above 32, bias, plain and double-quantized absmax, against the
    fp64 oracle; run twice, equal; a row's result does not depend on the other row of x (M = 2's
    first row is M = 1's bit for bit); within the tolerance of the row layout."""
    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels import nf4_configs
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    g = torch.Generator().manual_seed(N + K + r + 1)
    w = NF4Tensor.quantize((torch.randn(N, K, generator=g) * 0.05).cuda(), blocksize=64, compress_statistics=nested)
    wd = nf4h.dequantize_oracle(w, torch.float64)
    b = (torch.randn(N, r, generator=g) * 0.1).to("cuda", dtype)
    bias = torch.randn(N, generator=g).to("cuda", dtype)
    cfgs = {c for c in nf4_configs.decode_mma_candidates(1, cuda=True)}
    assert cfgs and all(c.cols for c in cfgs)
    assert {c for c in nf4_configs.decode_mma_candidates(2, cuda=True) if c.cols} == cfgs
    cfgs |= {DecodeMmaConfig(s, kb, cols=True) for s in (2, 4, 8) for kb in (1, 3, 7)}
    # 16-warp blocks of G row groups: a block's last group short (N = 1000: 63 groups), warps
    # with no steps (K = 64), a warp's steps across two groups (G = 3, 7: U = 17 or 56 steps)
    cfgs |= {DecodeMmaConfig(0, cols=True, groups=gr) for gr in (1, 2, 3, 7, 16)}
    # 8 weight rows a warp (N = 37: a last group of 5 rows; grid splits of 3)
    cfgs |= {DecodeMmaConfig(s, kb, cols=True, rows=8) for s in (2, 4, 8) for kb in (1, 3)}
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
    x2 = torch.randn(2, K, generator=g).to("cuda", dtype)
    xa2 = (torch.randn(2, r + 5, generator=g) * 0.5).to("cuda", dtype)[:, 2:2 + r]
    for M in (1, 2):
        x, xa = x2[:M].contiguous(), xa2[:M]
        ref = x.double() @ wd.t() + 1.5 * (xa.double() @ b.double().t()) + bias.double()
        ref_plain = x.double() @ wd.t()
        rows = nf4_decode_mma(x, w, DecodeMmaConfig(4, 1))
        for cfg in sorted(cfgs, key=str):
            y = nf4_decode_mma(x, w, cfg, xa=xa, lora_b=b, scale=1.5, bias=bias)
            assert y.shape == (M, N) and y.dtype == dtype
            assert rel(y, ref) < tol, (M, cfg)
            assert torch.equal(nf4_decode_mma(x, w, cfg, xa=xa, lora_b=b, scale=1.5, bias=bias), y)
            plain = nf4_decode_mma(x, w, cfg)
            assert rel(plain, ref_plain) < tol, (M, cfg)
            assert rel(plain, rows) < tol, (M, cfg)
            if M == 2:
                assert torch.equal(plain[:1], nf4_decode_mma(x[:1].contiguous(), w, cfg)), cfg


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
def test_gpu_decode_mma_many_weights_one_launch(dtype, nested):
    """q, k, v (or gate, up) of one x in one launch: each weight's blocks are the ones its own
    launch runs, so every output is bit for bit its own launch's, for the row layout (M = 5),
    the column layout (16 and 8 rows a warp) and the 16-warp blocks (a part whose last block has
    fewer row groups), with LoRA terms from column slices of one xa, biases, and N not a multiple
    of 16 (a part's last group short); a weight with another K is launched on its own."""
    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma, nf4_decode_mma_many, shares_launch
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    g = torch.Generator().manual_seed(11 + nested)
    K, ns, rs = 1088, (300, 77, 77), (16, 8, 16)
    ws = [NF4Tensor.quantize((torch.randn(n, K, generator=g) * 0.05).cuda(), blocksize=64,
                             compress_statistics=nested) for n in ns]
    bs = [(torch.randn(n, r, generator=g) * 0.1).to("cuda", dtype) for n, r in zip(ns, rs)]
    biases = [torch.randn(n, generator=g).to("cuda", dtype) for n in ns]
    cols = [0, rs[0], rs[0] + rs[1]]
    cfgs = [(5, DecodeMmaConfig(4, 1)), (5, DecodeMmaConfig(8, 1)), (1, DecodeMmaConfig(4, 1, cols=True)),
            (2, DecodeMmaConfig(2, 1, cols=True, rows=8)), (1, DecodeMmaConfig(0, cols=True, groups=3)),
            (2, DecodeMmaConfig(0, cols=True, groups=2))]
    for M, cfg in cfgs:
        x = torch.randn(M, K, generator=g).to("cuda", dtype)
        xa = (torch.randn(M, sum(rs) + 3, generator=g) * 0.5).to("cuda", dtype)
        xas = [xa[:, c:c + r] for c, r in zip(cols, rs)]
        assert shares_launch(ws, cfg)
        many = nf4_decode_mma_many(x, ws, cfg, xas=xas, lora_bs=bs, scales=[1.5, 0.5, 2.0], biases=biases)
        for w, xa_i, b, s, bias, y in zip(ws, xas, bs, (1.5, 0.5, 2.0), biases, many):
            assert torch.equal(y, nf4_decode_mma(x, w, cfg, xa=xa_i, lora_b=b, scale=s, bias=bias)), (M, cfg)
        plain = nf4_decode_mma_many(x, ws[:2], cfg)
        assert all(torch.equal(y, nf4_decode_mma(x, w, cfg)) for w, y in zip(ws[:2], plain)), (M, cfg)
    other = NF4Tensor.quantize((torch.randn(40, 64, generator=g) * 0.05).cuda(), blocksize=64,
                               compress_statistics=nested)
    x = torch.randn(1, K, generator=g).to("cuda", dtype)
    assert not shares_launch([ws[1], other], DecodeMmaConfig(4, 1, cols=True))
    with pytest.raises(ValueError, match="K = 1088"):
        nf4_decode_mma_many(x, [ws[1], other], DecodeMmaConfig(4, 1, cols=True))


@pytest.mark.gpu
def test_gpu_decode_mma_in_the_dispatch():
    """At 2..16 rows the dispatch times the tensor-core decode beside the Triton tiles, and
    whatever it picks agrees with the plain path; a CUDA graph replays it (the grid split's
    counters are left at zero)."""
    nf4_dispatch.clear()
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig
    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma

    N, K, r = 1024, 4096, 16
    w, wd = _bnb_weight(N, K, seed=3)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(16, K, device="cuda", generator=g, dtype=torch.bfloat16)
    a = torch.randn(r, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    b = torch.randn(N, r, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    xa = x @ a.t()
    ref = x.float() @ wd.t() + 0.5 * (xa.float() @ b.float().t())
    (y,) = frozen_matmul(x, [w], xa=xa, lora_b=[b], scales=[0.5])
    assert rel(y, ref) < 1e-2
    y0 = nf4_decode_mma(x, w, DecodeMmaConfig(2, 8))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = nf4_decode_mma(x, w, DecodeMmaConfig(2, 8))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, y0)


def test_decode_mma_refuses_what_it_cannot_take():
    """A CPU input, or more than 16 rows, or the column layout at more than 2 rows, or a bad
    config (16-warp blocks without the column layout, or with a grid split, or of more than 16
    row groups; a split not 2, 4 or 8), is refused with what the kernel needs, before touching
    the extension; runs without a GPU."""
    from fastqlora.ops.nf4_decode_mma import available, nf4_decode_mma
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig

    w = NF4Tensor.quantize(torch.randn(64, 128) * 0.05, blocksize=64, compress_statistics=True)
    for x in (torch.randn(2, 128, dtype=torch.bfloat16), torch.randn(17, 128, dtype=torch.bfloat16)):
        assert not available(x, w)
        with pytest.raises(ValueError, match=f"1 to 16 contiguous.*got x \\({x.shape[0]}, 128\\)"):
            nf4_decode_mma(x, w, DecodeMmaConfig(2))
    with pytest.raises(ValueError, match="column layout.*1 to 2 rows of x, got 3"):
        nf4_decode_mma(torch.randn(3, 128, dtype=torch.bfloat16), w, DecodeMmaConfig(2, cols=True))
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    for cfg in (DecodeMmaConfig(0, groups=7), DecodeMmaConfig(0, cols=True, groups=17),
                DecodeMmaConfig(0, 2, cols=True, groups=7), DecodeMmaConfig(3), DecodeMmaConfig(2, 65),
                DecodeMmaConfig(8, rows=8), DecodeMmaConfig(8, cols=True, rows=4),
                DecodeMmaConfig(0, cols=True, groups=2, rows=8)):
        with pytest.raises(ValueError, match="groups .* must be 1..16|split must be 2, 4 or 8|rows .* must be 16"):
            nf4_decode_mma(x, w, cfg)


@pytest.mark.parametrize("which", ["gemv", "mma"])
@pytest.mark.parametrize("bad,err,match", [
    (dict(xa=torch.float32), TypeError, "xa is torch.float32 but x is torch.bfloat16"),
    (dict(lora_b=torch.float16), TypeError, "lora_b is torch.float16"),
    (dict(bias=torch.float32), TypeError, "bias is torch.float32"),
    (dict(b_rows=63), ValueError, "lora_b must be \\[N=64, r\\]"),
    (dict(xa_cols=8), ValueError, "xa's last dimension r"),
    (dict(bias_n=65), ValueError, "bias must have N = 64 values"),
])
def test_decode_kernels_check_lora_and_bias_first(which, bad, err, match):
    """The extension's decode kernels read the LoRA operands and the bias as raw memory in
    x's element type: a wrong dtype or shape is refused by name before anything else (so
    this runs without a GPU), never read as garbage."""
    from fastqlora.ops.nf4_decode_mma import nf4_decode_mma
    from fastqlora.ops.nf4_gemv_cuda import nf4_gemv_cuda
    from fastqlora.quant import NF4Tensor
    from fastqlora.triton_kernels.nf4_configs import DecodeMmaConfig, GemvConfig

    w = NF4Tensor.quantize(torch.randn(64, 128) * 0.05, blocksize=64, compress_statistics=True)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    xa = torch.randn(1, bad.get("xa_cols", 16)).to(bad.get("xa", torch.bfloat16))
    b = torch.randn(bad.get("b_rows", 64), 16).to(bad.get("lora_b", torch.bfloat16))
    bias = torch.randn(bad.get("bias_n", 64)).to(bad.get("bias", torch.bfloat16))
    with pytest.raises(err, match=match):
        if which == "gemv":
            nf4_gemv_cuda(x, w, GemvConfig(4, 1, 8, cuda=True), xa=xa, lora_b=b, bias=bias)
        else:
            nf4_decode_mma(x, w, DecodeMmaConfig(2), xa=xa, lora_b=b, bias=bias)


@pytest.mark.parametrize("change,match", [
    (dict(K=96), "multiple of 64"), (dict(M=17), "1 to 16 rows"), (dict(M=0), "1 to 16 rows"),
    (dict(split=3), "2, 4 or 8"), (dict(kb=0), "1..64"), (dict(kb=2), "workspace"),
    (dict(x=4104), "16-byte aligned"), (dict(blocksize2=200), "power of two"),
    (dict(N=2**25), "under 2 GiB"), (dict(dtype=0), "fp16 or bf16"), (dict(cols=True), "1 or 2 rows of x, got 4"),
    (dict(groups=3), "groups=3, cols=0"), (dict(M=2, cols=True, groups=17), "1..16"),
    (dict(M=2, cols=True, groups=2, kb=2, ws=64, counters=64), "kb=2"),
    (dict(rows=8), "rows=8, cols=0"), (dict(M=2, cols=True, rows=12), "rows=12"),
    (dict(M=2, cols=True, rows=8, groups=2), "groups=2"),
])
def test_decode_mma_binding_checks_before_launch(change, match):
    """The tensor-core decode refuses a bad shape or config before touching memory or the
    GPU (so this runs without one), naming what is wrong; the arguments in the order
    ops/nf4_decode_mma.py passes them."""
    from fastqlora._ext import built_with_cuda, ext

    if not built_with_cuda():
        pytest.skip("the extension was built without CUDA")
    args = dict(x=4096, M=4, K=128, packed=8192, code=0, absmax=0, qabsmax=16, code2=0, absmax2=0, offset=0.0,
                blocksize2=256, N=8, xa=0, xa_stride=0, lora_b=0, rank=0, scale=1.0, bias=0, y=0, dtype=2, split=2,
                kb=1, cols=False, groups=0, rows=16, ws=0, counters=0, stream=0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ext().nf4_decode_mma_cuda(*args.values())


@pytest.mark.parametrize("split", [1, 2])
def test_gemv_kernel_fp32(kernel_device, split):
    """The tensor-core-free one-row kernel, with LoRA, bias and split-K (run twice: the
    split counters must be back at zero)."""
    from fastqlora.triton_kernels.nf4_configs import GemvConfig
    from fastqlora.triton_kernels.nf4_gemv import nf4_gemv

    K, N, r, s = 192, 100, 8, 1.5
    (w,), x, (a,), (b,), (bias,) = _case(1, N, K, r, kernel_device, torch.float32, seed=split + 40)
    xa = x @ a.t()
    y = nf4_gemv(x, w, GemvConfig(64, split, 4), xa=xa, lora_b=b, scale=s, bias=bias)
    wd = nf4h.dequantize_oracle(w, torch.float64)
    ref = x.double() @ wd.t() + s * (xa.double() @ b.double().t()) + bias.double()
    assert y.shape == (1, N) and rel(y, ref) < 1e-5
    assert torch.equal(nf4_gemv(x, w, GemvConfig(64, split, 4), xa=xa, lora_b=b, scale=s, bias=bias), y)


def test_dispatch_error_check_treats_nan_as_infinite():
    """A config whose result is NaN in any output fails the dispatch's check, whichever output it is."""
    good, want = torch.ones(4), torch.ones(4)
    bad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    assert nf4_dispatch._rel_err(good, want) == 0.0
    assert nf4_dispatch._rel_err(bad, want) == float("inf")
    assert max(nf4_dispatch._rel_err(g, want) for g in (good, bad)) == float("inf")
    assert not max(nf4_dispatch._rel_err(g, want) for g in (good, bad)) < nf4_dispatch.CHECK_TOL


@pytest.mark.gpu
def test_gpu_dispatch_refuses_a_wrong_config():
    """The tuner checks each fused config's result against dequantize + cuBLAS first."""
    nf4_dispatch.clear()
    w, _ = _bnb_weight(256, 512, seed=3)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    from fastqlora.ops.nf4_linear import dense

    plain = lambda: [x @ dense(w, x.dtype).t()]  # noqa: E731
    wrong = lambda cfg: [v * 1.5 for v in plain()]  # noqa: E731  (a "kernel" that is 50% off)
    with pytest.warns(RuntimeWarning, match="relative error"):
        pick = nf4_dispatch.choose("fwd", x, [256], 512, 0, wrong, plain)
    assert pick == nf4_dispatch.CUBLAS
    assert nf4_dispatch.rejected() and all(r[2] > 0.3 for r in nf4_dispatch.rejected()[-3:])
    nf4_dispatch.clear()
