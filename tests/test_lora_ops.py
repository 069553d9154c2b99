"""LoRA ops (lora_linear, lora_qkv, lora_mlp) and their hand-written backward passes.

Oracles: float64 autograd through bitsandbytes-exact dequantized weights, and PEFT's own
LoraLayer on a dense nn.Linear. Each op runs on the plain torch path (CPU) and through
the Triton kernels (interpreter on CPU, compiled on GPU).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import _nf4_helpers as nf4h

from fastqlora.ops import backend
from fastqlora.ops.lora_fused import LoraProj, lora_linear, lora_qkv
from fastqlora.ops.lora_mlp import lora_mlp
from fastqlora.ops.lora_fused import lora_linear_reference
from fastqlora.ops.lora_mlp import gated_act_bwd_reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a is not None and not torch.isnan(a).any(), "missing or NaN result"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(params=["torch", "kernels"])
def path(request):
    """(device, context): the plain torch path on CPU, or the kernels on kernel_device."""
    if request.param == "torch":
        return "cpu", contextlib.nullcontext
    dev = request.getfixturevalue("kernel_device")
    return dev, (lambda: backend("triton"))


class Proj:
    """A projection's parameters in fp32 (for the op) and float64 leaf copies (oracle)."""

    def __init__(self, n, k, r, dev, g, nf4=True, bias=False, lora=True, scale=0.5):
        w = torch.randn(n, k, generator=g) * 0.05
        if nf4:
            self.weight = nf4h.quantize(w.to(dev))
            self.w64 = nf4h.dequantize_oracle(self.weight, torch.float64)
        else:
            self.weight = w.to(dev)
            self.w64 = self.weight.double()
        self.scale = scale
        self.a = (torch.randn(r, k, generator=g) * 0.1).to(dev).requires_grad_() if lora else None
        self.b = (torch.randn(n, r, generator=g) * 0.1).to(dev).requires_grad_() if lora else None
        self.bias = (torch.randn(n, generator=g) * 0.1).to(dev).requires_grad_() if bias else None
        leaf = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
        self.a64, self.b64, self.bias64 = leaf(self.a), leaf(self.b), leaf(self.bias)

    def op(self, dropout=0.0) -> LoraProj:
        return LoraProj(self.weight, self.bias, self.a, self.b, self.scale, dropout)

    def ref(self, x64):
        y = x64 @ self.w64.t()
        if self.bias64 is not None:
            y = y + self.bias64
        if self.a64 is not None:
            y = y + self.scale * (x64 @ self.a64.t()) @ self.b64.t()
        return y

    def check_grads(self, tol):
        for mine, ref in ((self.a, self.a64), (self.b, self.b64), (self.bias, self.bias64)):
            if ref is not None:
                assert rel(mine.grad, ref.grad) < tol


def _x(shape, dev, g, dtype=torch.float32):
    x = torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_()
    return x, x.detach().double().requires_grad_()


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("shape", [(1, 128), (3, 11, 128)], ids=["M1", "M33"])
def test_lora_linear(path, nf4, shape):
    dev, ctx = path
    g = torch.Generator().manual_seed(len(shape) + nf4)
    p = Proj(192, 128, 8, dev, g, nf4=nf4, bias=True)
    x, x64 = _x(shape, dev, g)
    with ctx():
        y = lora_linear(x, p.weight, p.bias, p.a, p.b, p.scale)
    ref = p.ref(x64)
    assert y.shape == shape[:-1] + (192,) and rel(y, ref) < 1e-5
    dy = torch.randn(ref.shape, generator=g)
    y.backward(dy.to(dev))
    ref.backward(dy.double().to(dev))
    assert rel(x.grad, x64.grad) < 1e-5
    p.check_grads(1e-5)


def test_lora_qkv(path):
    dev, ctx = path
    g = torch.Generator().manual_seed(11)
    q = Proj(192, 128, 8, dev, g, bias=True)
    k = Proj(64, 128, 8, dev, g, bias=True, scale=2.0)
    v = Proj(100, 128, 4, dev, g, bias=True, scale=1.0)
    x, x64 = _x((2, 17, 128), dev, g)
    with ctx():
        outs = lora_qkv(x, q.op(), k.op(), v.op())
    refs = [p.ref(x64) for p in (q, k, v)]
    loss = sum((o * torch.sin(torch.arange(o.numel(), device=dev).view_as(o) * 0.1)).sum() for o in outs)
    loss64 = sum((o * torch.sin(torch.arange(o.numel(), device=dev).view_as(o) * 0.1).double()).sum() for o in refs)
    for o, rf in zip(outs, refs):
        assert rel(o, rf) < 1e-5
    loss.backward()
    loss64.backward()
    assert rel(x.grad, x64.grad) < 1e-5
    for p in (q, k, v):
        p.check_grads(1e-5)


@pytest.mark.parametrize("act,variant", [("silu", "full"), ("gelu_tanh", "full"), ("silu", "bias_no_down_lora")])
def test_lora_mlp(path, act, variant):
    dev, ctx = path
    g = torch.Generator().manual_seed(7)
    H, I = 128, 192
    bias = variant != "full"
    gate = Proj(I, H, 8, dev, g, bias=bias)
    up = Proj(I, H, 8, dev, g, bias=bias, scale=2.0)
    down = Proj(H, I, 8, dev, g, bias=bias, lora=variant == "full", scale=1.5)
    x, x64 = _x((17, H), dev, g)
    with ctx():
        y = lora_mlp(x, gate.op(), up.op(), down.op(), act)
    h64 = _act64(gate.ref(x64), act) * up.ref(x64)
    ref = down.ref(h64)
    assert rel(y, ref) < 1e-5
    dy = torch.randn(ref.shape, generator=g)
    y.backward(dy.to(dev))
    ref.backward(dy.double().to(dev))
    assert rel(x.grad, x64.grad) < 1e-5
    for p in (gate, up, down):
        p.check_grads(1e-5)


def _act64(z, act):
    return F.silu(z) if act == "silu" else F.gelu(z, approximate="tanh")


def test_dropout_path_matches_reference():
    """dropout > 0: the slower path draws the same masks as PEFT-style F.dropout under one seed."""
    g = torch.Generator().manual_seed(2)
    p = Proj(192, 128, 8, "cpu", g, bias=True)
    x = torch.randn(5, 7, 128, generator=g, requires_grad=True)
    torch.manual_seed(123)
    y = lora_linear(x, p.weight, p.bias, p.a, p.b, p.scale, dropout=0.3)
    y.square().sum().backward()
    mine = [t.grad.clone() for t in (x, p.a, p.b, p.bias)]
    for t in (x, p.a, p.b, p.bias):
        t.grad = None
    torch.manual_seed(123)
    y_ref = lora_linear_reference(x, p.op(0.3))
    y_ref.square().sum().backward()
    assert rel(y, y_ref) < 1e-6
    for m, t in zip(mine, (x, p.a, p.b, p.bias)):
        assert rel(m, t.grad) < 1e-5
    # and the MLP's dropout path runs three such projections
    gate, up, down = (Proj(n, k, 4, "cpu", g) for n, k in ((192, 128), (192, 128), (128, 192)))
    torch.manual_seed(5)
    y = lora_mlp(x, gate.op(0.1), up.op(0.1), down.op(0.1))
    torch.manual_seed(5)
    gr = lora_linear_reference(x, gate.op(0.1))
    ur = lora_linear_reference(x, up.op(0.1))
    assert rel(y, lora_linear_reference(F.silu(gr) * ur, down.op(0.1))) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_matches_peft_lora_layer(dropout):
    """A peft LoraLayer on a dense nn.Linear: same output and gradients (fp32, CPU)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(128, 96, bias=True))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.proj
    base = layer.base_layer
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    layer.train()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    x = torch.randn(3, 9, 128, requires_grad=True)
    dy = torch.randn(3, 9, 96)
    torch.manual_seed(99)
    y_peft = layer(x)
    y_peft.backward(dy)
    want = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    torch.manual_seed(99)
    y = lora_linear(x, base.weight, base.bias, A, B, scale, dropout=dropout)
    y.backward(dy)
    assert rel(y, y_peft) < 1e-6
    for t, w in zip((x, A, B), want):
        assert rel(t.grad, w) < 1e-5


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_act_bwd_kernel(kernel_device, act):
    from fastqlora.triton_kernels.activation import act_mul_backward_

    g = torch.Generator().manual_seed(0)
    gt, ut, dh = (torch.randn(3, 1000, generator=g).to(kernel_device) * 3 for _ in range(3))
    g64 = gt.double().requires_grad_()
    u64 = ut.double().requires_grad_()
    h64 = _act64(g64, act) * u64
    h64.backward(dh.double())
    h_ref, dg_ref, du_ref = gated_act_bwd_reference(gt, ut, dh, act)
    act_mul_backward_(dh, gt, ut, act == "gelu_tanh", store_h=True)
    for mine, ref, want in ((dh, h_ref, h64), (gt, dg_ref, g64.grad), (ut, du_ref, u64.grad)):
        assert rel(mine, want) < 1e-6 and rel(ref, want) < 1e-6


def test_errors_name_the_problem():
    g = torch.Generator().manual_seed(0)
    p = Proj(64, 128, 4, "cpu", g)
    with pytest.raises(ValueError, match="input features"):
        lora_linear(torch.randn(2, 96), p.weight, None, p.a, p.b)
    with pytest.raises(ValueError, match="both be given"):
        lora_linear(torch.randn(2, 128), p.weight, None, p.a, None)
    with pytest.raises(ValueError, match="unknown activation"):
        lora_mlp(torch.randn(2, 128), p.op(), p.op(), p.op(), "relu")


# ---------------------------------------------------------------- GPU: real shapes in bf16
def _bnb(n, k, g):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    return nf4h.from_bnb(packed, qs), bnbf.dequantize_4bit(packed, qs).float()


def _gpu_proj(n, k, r, g, scale):
    w, wd = _bnb(n, k, g)
    a = (torch.randn(r, k, device="cuda", generator=g) / math.sqrt(k)).requires_grad_()
    b = (torch.randn(n, r, device="cuda", generator=g) * 0.05).requires_grad_()
    return LoraProj(w, None, a, b, scale), wd


@pytest.mark.gpu
@pytest.mark.parametrize("path", [None, "fused", "dequant+cublas"])
@pytest.mark.parametrize("M", [1, 333, 4096])
def test_gpu_mlp_llama8b_bf16(M, path):
    """Whatever the tuner picks, and each path forced, against fp32 on the same weights."""
    from fastqlora.ops import nf4_dispatch

    g = torch.Generator(device="cuda").manual_seed(M)
    H, I = 4096, 14336
    (gate, wg), (up, wu), (down, wd) = (_gpu_proj(n, k, 16, g, 1.0) for n, k in ((I, H), (I, H), (H, I)))
    x = torch.randn(M, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(M, H, device="cuda", generator=g, dtype=torch.bfloat16)
    with nf4_dispatch.force(path):
        y = lora_mlp(x, gate, up, down, "silu")
        y.backward(dy)
    mine = [x.grad] + [t.grad for p in (gate, up, down) for t in (p.lora_A, p.lora_B)]
    for p in (gate, up, down):
        p.lora_A.grad = p.lora_B.grad = None
    xf = x.detach().float().requires_grad_()
    gf = xf @ wg.t() + (xf @ gate.lora_A.t()) @ gate.lora_B.t()
    uf = xf @ wu.t() + (xf @ up.lora_A.t()) @ up.lora_B.t()
    hf = F.silu(gf) * uf
    yf = hf @ wd.t() + (hf @ down.lora_A.t()) @ down.lora_B.t()
    yf.backward(dy.float())
    want = [xf.grad] + [t.grad for p in (gate, up, down) for t in (p.lora_A, p.lora_B)]
    assert rel(y, yf) < 1e-2
    for i, (m, w) in enumerate(zip(mine, want)):
        assert rel(m, w) < 1e-2, i


@pytest.mark.gpu
@pytest.mark.parametrize("M", [17, 4096])
def test_gpu_qkv_o_llama8b_bf16(M):
    g = torch.Generator(device="cuda").manual_seed(M)
    H = 4096
    projs = [_gpu_proj(n, H, 16, g, 2.0) for n in (4096, 1024, 1024, 4096)]
    x = torch.randn(M, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    q, k, v = lora_qkv(x, *(p for p, _ in projs[:3]))
    o = lora_linear(q, projs[3][0].weight, None, projs[3][0].lora_A, projs[3][0].lora_B, 2.0)
    loss = o.float().square().mean() + k.float().sum() + v.float().square().sum() * 1e-3
    loss.backward()
    mine = [x.grad] + [t.grad for p, _ in projs for t in (p.lora_A, p.lora_B)]
    for p, _ in projs:
        p.lora_A.grad = p.lora_B.grad = None
    xf = x.detach().float().requires_grad_()
    outs = [xf @ wd.t() + 2.0 * (xf @ p.lora_A.t()) @ p.lora_B.t() for p, wd in projs[:3]]
    p, wd = projs[3]
    of = outs[0] @ wd.t() + 2.0 * (outs[0] @ p.lora_A.t()) @ p.lora_B.t()
    lossf = of.square().mean() + outs[1].sum() + outs[2].square().sum() * 1e-3
    lossf.backward()
    want = [xf.grad] + [t.grad for p, _ in projs for t in (p.lora_A, p.lora_B)]
    for a, b in zip((q, k, v, o), (*outs, of)):
        assert rel(a, b) < 1e-2
    for i, (m, w) in enumerate(zip(mine, want)):
        assert rel(m, w) < 1e-2, i
