"""The plain LoRA projection op (ops/lora_linear.py, the default training path) and the
per-forward caches that spare its launches: the adapter's 16-bit copies of A and B, and
FrozenLinear's NF4 view.

Oracle: float64 autograd of ``x·Wᵀ + b + s·(x_l·Aᵀ)·Bᵀ`` with W dequantized by the
test-side NF4 oracle (bitsandbytes' order), on odd sizes.
"""
from __future__ import annotations

import pytest
import torch

import _nf4_helpers as nf4h

from fastqlora.lora import LoraAdapter, cast_all, next_cast_epoch
from fastqlora.models.linear import FrozenLinear
from fastqlora.ops.lora_decode import decoding
from fastqlora.ops.lora_linear import lora_linear


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a is not None
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("nf4", [True, False])
@pytest.mark.parametrize("separate_input", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_float64(device, dtype, tol, nf4, separate_input, bias):
    """On the CPU, and on the GPU (cuBLAS, the CUDA dequantize) where there is one."""
    torch.manual_seed(0)
    torch.set_default_device(device)
    try:
        _check_lora_linear(dtype, tol, nf4, separate_input, bias)
    finally:
        torch.set_default_device("cpu")


def _check_lora_linear(dtype, tol, nf4, separate_input, bias):
    N, K, r, s = 136, 192, 5, 1.75
    w32 = torch.randn(N, K) * 0.05
    if nf4:
        weight = nf4h.quantize(w32)
        w_ref = nf4h.dequantize_oracle(weight, torch.float32)
    else:
        weight = w32.to(dtype)
        w_ref = weight.float()
    x = torch.randn(2, 7, K).to(dtype).requires_grad_(True)
    # a dropout-like branch input: a function of x whose gradient must reach x through x_l
    mask = (torch.rand(2, 7, K) > 0.3).to(dtype) * 1.5
    xl = x * mask if separate_input else None
    b = (torch.randn(N) * 0.1).to(dtype).requires_grad_(True) if bias else None
    A = (torch.randn(r, K) * 0.1).requires_grad_(True)  # fp32 master weights
    B = (torch.randn(N, r) * 0.1).requires_grad_(True)

    y = lora_linear(x, weight, b, A, B, s, xl)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    xl64 = x64 * mask.double() if separate_input else None
    A64, B64 = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if bias else None
    y64 = x64 @ w_ref.double().t() + (b64 if bias else 0) + s * ((xl64 if separate_input else x64) @ A64.t()) @ B64.t()
    y64.backward(dy.double())

    assert y.dtype == dtype and y.shape == (2, 7, N)
    assert rel(y, y64) < tol
    assert rel(x.grad, x64.grad) < tol
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert rel(A.grad, A64.grad) < tol
    assert rel(B.grad, B64.grad) < tol
    if bias:
        assert rel(b.grad, b64.grad) < tol


def test_lora_linear_with_given_casts_uses_them():
    """``cast`` (A and B already in x's dtype) is what the product uses, not lora_A/B."""
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    w = torch.randn(40, 64)
    A, B = torch.randn(4, 64), torch.randn(40, 4)
    got = lora_linear(x, w, None, A, B, 0.5, cast=(2 * A, B))
    want = x @ w.t() + 0.5 * (x @ (2 * A).t()) @ B.t()
    assert rel(got, want) < 1e-5


def test_adapter_casts_once_a_forward_and_again_after_a_change():
    torch.manual_seed(2)
    ad = LoraAdapter(64, 48, r=4, alpha=8)
    with torch.no_grad():
        ad.lora_B.normal_()
    next_cast_epoch()
    a1, b1 = ad.cast_weights(torch.bfloat16)
    a2, b2 = ad.cast_weights(torch.bfloat16)
    assert a1 is a2 and b1 is b2 and a1.dtype == torch.bfloat16 and not a1.requires_grad
    assert torch.equal(a1, ad.lora_A.detach().to(torch.bfloat16))
    # an optimizer step changes A in place (its version counter moves): cast again
    opt = torch.optim.SGD(ad.parameters(), lr=0.5)
    ad.lora_A.grad = torch.ones_like(ad.lora_A)
    ad.lora_B.grad = torch.ones_like(ad.lora_B)
    opt.step()
    a3, b3 = ad.cast_weights(torch.bfloat16)
    assert torch.equal(a3, ad.lora_A.detach().to(torch.bfloat16)) and not torch.equal(a3, a1)
    assert torch.equal(b3, ad.lora_B.detach().to(torch.bfloat16))
    # a write through .data does not move the version counter; the next forward recasts
    ad.lora_B.data.mul_(3.0)
    next_cast_epoch()
    _, b4 = ad.cast_weights(torch.bfloat16)
    assert torch.equal(b4, ad.lora_B.detach().to(torch.bfloat16))
    # another dtype is its own cast
    a5, _ = ad.cast_weights(torch.float16)
    assert a5.dtype == torch.float16


def test_frozen_linear_nf4_view_follows_its_buffers():
    torch.manual_seed(3)
    lin = FrozenLinear(128, 24)
    q = nf4h.quantize(torch.randn(24, 128))
    lin.set_nf4(q)
    v1 = lin.nf4()
    assert lin.nf4() is v1  # reused while the buffers are the same tensors
    q2 = nf4h.quantize(torch.randn(24, 128))
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    state["nf4_packed"] = q2.packed.clone()
    lin.load_state_dict(state, assign=True)  # new buffer objects
    v2 = lin.nf4()
    assert v2 is not v1 and torch.equal(v2.packed, q2.packed)
    lin.set_nf4(q2)
    assert torch.equal(lin.nf4().dequantize(torch.float32), q2.dequantize(torch.float32))
    lin.to(torch.device("cpu"))
    assert lin._nf4_view is None  # dropped by _apply: it must not pin the old tensors


def test_cast_all_is_what_cast_weights_returns():
    torch.manual_seed(4)
    ads = [LoraAdapter(32 + i, 16, r=2 + i, alpha=4) for i in range(3)]
    for ad in ads:
        with torch.no_grad():
            ad.lora_B.normal_()
    next_cast_epoch()
    cast_all(ads, torch.bfloat16)
    for ad in ads:
        a, b = ad.cast_weights(torch.bfloat16)
        assert a is ad._cast[1] and b is ad._cast[2]
        assert torch.equal(a, ad.lora_A.detach().to(torch.bfloat16))
        assert torch.equal(b, ad.lora_B.detach().to(torch.bfloat16))
    old = ads[0]._cast[1]
    next_cast_epoch()
    cast_all(ads, torch.bfloat16)
    assert ads[0].cast_weights(torch.bfloat16)[0] is not old  # fresh copies: the old may be saved for a backward


@pytest.mark.parametrize("bias", [False, True])
def test_output_may_be_changed_in_place(bias):
    """RoPE rotates q and k in place through views of the projection's output (Qwen 2's q, k
    with biases, without checkpointing): the op must return a tensor that allows it."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 64, requires_grad=True)
    w = torch.randn(32, 64)
    b = torch.randn(32) if bias else None
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    y = lora_linear(x, w, b, A, B, 0.5)
    y.view(2, 3, 4, 8).mul_(2.0)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    y64 = 2 * (x64 @ w.double().t() + (b.double() if bias else 0) + 0.5 * (x64 @ A.detach().double().t())
               @ B.detach().double().t())
    y64.sum().backward()
    assert rel(y, y64) < 1e-5 and rel(x.grad, x64.grad) < 1e-5


class _AtenCounter:
    """Counts the aten ops dispatched inside the block (what becomes kernel launches on CUDA)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}
        casts: list[tuple[int, ...]] = []  # the shapes _to_copy (a cast) was asked of

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                counts[name] = counts.get(name, 0) + 1
                if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
                    casts.append(tuple(args[0].shape))
                return func(*args, **(kwargs or {}))

        self.counts, self.casts, self.mode = counts, casts, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_lora_term_needs_no_separate_scale_or_add():
    """The launch cut this op exists for: the LoRA term and dx_l go through addmm's alpha,
    dA/dB are scaled and cast by one mul each; no elementwise add anywhere, and the casts
    of A and B come from the caller (cast_weights), not from the op."""
    torch.manual_seed(6)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    w = nf4h.quantize(torch.randn(48, 64))
    ad = LoraAdapter(64, 48, r=4, alpha=8)
    next_cast_epoch()
    cast = ad.cast_weights(torch.bfloat16)
    with _AtenCounter() as fwd:
        y = lora_linear(x, w, None, ad.lora_A, ad.lora_B, ad.scale, cast=cast)
    with _AtenCounter() as bwd:
        y.backward(torch.randn_like(y))
    assert not any(k in fwd for k in ("add", "add_", "mul", "mul_", "_to_copy")), fwd
    assert fwd.get("addmm_", 0) == 1, fwd
    assert not any(k in bwd for k in ("add", "add_", "_to_copy")), bwd
    assert bwd.get("mul", 0) == 2 and bwd.get("addmm_", 0) == 1, bwd  # dA, dB scaled; dx_l into dx
    assert ad.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def _tiny_lora_model(path, family: str, dtype: torch.dtype, checkpointing: bool, b_std: float = 0.0):
    """A random 2-layer checkpoint of ``family`` loaded in 4-bit on the CPU, LoRA r=4 on the
    seven projections (B drawn with ``b_std`` when non-zero, so the adapters matter)."""
    from helpers import write_hf_model

    from fastqlora import FastLanguageModel

    write_hf_model(path, family, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=101, head_dim=16)
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_4bit=True, dtype=dtype, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    if b_std:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, b_std)
    return model


@pytest.mark.parametrize("grouped", [False, True])
def test_model_forward_casts_every_adapter_once(tmp_path, monkeypatch, grouped):
    """A bf16 model's forward casts all adapters' A and B in one multi-tensor copy before
    the first layer; the projections then cast nothing (no per-adapter _to_copy). Grouped,
    the copy writes q/k/v's and gate/up's A stacked, each adapter's A a row block of it."""
    monkeypatch.setenv("FASTQLORA_GROUPED_LORA", "1" if grouped else "0")
    model = _tiny_lora_model(tmp_path, "llama", torch.bfloat16, checkpointing=True)
    ids = torch.randint(0, 101, (1, 9))
    adapters = [m for m in model.modules() if isinstance(m, LoraAdapter)]
    assert len(adapters) == 14
    counter = _AtenCounter()
    with counter as ops:
        model(input_ids=ids, labels=ids).loss.backward()
    assert ops.get("_foreach_copy_", 0) == 1, ops
    lora_shapes = {tuple(t.shape) for ad in adapters for t in (ad.lora_A, ad.lora_B)}
    assert not [c for c in counter.casts if c in lora_shapes], counter.casts
    assert all(ad._cast[1].dtype == torch.bfloat16 for ad in adapters)
    # what the projections read is the model forward's copy: same epoch, same tensors
    for ad in adapters:
        a, b = ad.cast_weights(torch.bfloat16)
        assert a is ad._cast[1] and torch.equal(a, ad.lora_A.detach().to(torch.bfloat16))
    assert all(ad.lora_A.grad is not None and ad.lora_A.grad.dtype == torch.float32 for ad in adapters)
    stacked = [ad for ad in adapters if getattr(ad, "_cast_cat", None) is not None]
    assert len(stacked) == (4 if grouped else 0)  # q (of q, k, v) and gate (of gate, up), 2 layers
    for ad in stacked:
        assert ad._cast[1].data_ptr() == ad._cast_cat[1].data_ptr()  # its A is the stack's first rows


@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_forwards_then_one_backward(tmp_path, checkpointing):
    """Each forward's 16-bit copies of A and B are fresh tensors, so a first forward's graph
    still holds its own when a second forward has cast again (an in-place refill would make
    the backward fail autograd's version check, or use the wrong values)."""
    model = _tiny_lora_model(tmp_path, "llama", torch.bfloat16, checkpointing, b_std=0.05)
    g = torch.Generator().manual_seed(7)
    ids1, ids2 = torch.randint(0, 101, (1, 9), generator=g), torch.randint(0, 101, (1, 11), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(*batches):
        model.zero_grad(set_to_none=True)
        sum(model(input_ids=i, labels=i).loss for i in batches).backward()
        return [p.grad.clone() for p in params]

    together = grads(ids1, ids2)
    apart = [a + b for a, b in zip(grads(ids1), grads(ids2))]
    assert max(rel(t, a) for t, a in zip(together, apart)) < 1e-2


# ---- the grouped op: projections that read the same x (q, k, v; gate, up) ----

from fastqlora.lora import cast_group  # noqa: E402
from fastqlora.ops.lora_linear import lora_linear_group  # noqa: E402


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n,nf4,bias", [(3, True, False), (3, False, True), (2, True, True), (2, False, False)])
def test_lora_group_matches_float64(device, dtype, tol, n, nf4, bias):
    torch.manual_seed(8)
    torch.set_default_device(device)
    try:
        K, s = 192, 0.75
        outs, ranks = [136, 72, 72][:n], [5, 3, 4][:n]
        w32 = [torch.randn(N, K) * 0.05 for N in outs]
        if nf4:
            weights = [nf4h.quantize(w) for w in w32]
            w_ref = [nf4h.dequantize_oracle(w, torch.float32) for w in weights]
        else:
            weights = [w.to(dtype) for w in w32]
            w_ref = [w.float() for w in weights]
        biases = [(torch.randn(N) * 0.1).to(dtype).requires_grad_(True) if bias else None for N in outs]
        As = [(torch.randn(r, K) * 0.1).requires_grad_(True) for r in ranks]
        Bs = [(torch.randn(N, r) * 0.1).requires_grad_(True) for N, r in zip(outs, ranks)]
        x = torch.randn(2, 7, K).to(dtype).requires_grad_(True)
        a_cat = torch.cat([a.detach() for a in As]).to(dtype)
        ys = lora_linear_group(x, weights, biases, As, Bs, s, a_cat, [b.detach().to(dtype) for b in Bs])
        dys = [torch.randn_like(y) for y in ys]
        torch.autograd.backward(ys, dys)

        x64 = x.detach().double().requires_grad_(True)
        l64 = [(t.detach().double().requires_grad_(True) if t is not None else None) for t in biases + As + Bs]
        b64, A64, B64 = l64[:n], l64[n:2 * n], l64[2 * n:]
        y64 = [x64 @ w_ref[i].double().t() + (b64[i] if bias else 0) + s * (x64 @ A64[i].t()) @ B64[i].t()
               for i in range(n)]
        torch.autograd.backward(y64, [d.double() for d in dys])
        for i in range(n):
            assert ys[i].dtype == dtype and rel(ys[i], y64[i]) < tol
            assert As[i].grad.dtype == torch.float32 and rel(As[i].grad, A64[i].grad) < tol
            assert Bs[i].grad.dtype == torch.float32 and rel(Bs[i].grad, B64[i].grad) < tol
            if bias:
                assert rel(biases[i].grad, b64[i].grad) < tol
        assert rel(x.grad, x64.grad) < tol
    finally:
        torch.set_default_device("cpu")


def test_lora_group_outputs_may_be_changed_in_place_and_launch_less():
    """RoPE rotates q and k in place; the group's thin products are one launch each."""
    torch.manual_seed(9)
    K = 64
    x = torch.randn(2, 3, K, dtype=torch.bfloat16, requires_grad=True)
    weights = [nf4h.quantize(torch.randn(N, K)) for N in (32, 16, 16)]
    ads = [LoraAdapter(K, N, r=4, alpha=8) for N in (32, 16, 16)]
    for ad in ads:
        with torch.no_grad():
            ad.lora_B.normal_()
    next_cast_epoch()
    a_cat, bs = cast_group(ads, torch.bfloat16)
    assert a_cat.shape == (12, K) and cast_group(ads, torch.bfloat16)[0] is a_cat  # kept for this forward
    args = (x, weights, [None] * 3, [a.lora_A for a in ads], [a.lora_B for a in ads], ads[0].scale, a_cat, bs)
    q, k, v = lora_linear_group(*args)
    q.view(2, 3, 4, 8).mul_(2.0)
    k.view(2, 3, 2, 8).mul_(2.0)
    (q.sum() + k.sum() + v.sum()).backward()  # allowed: no view of a Function's output
    for t in [x] + [p for a in ads for p in (a.lora_A, a.lora_B)]:
        t.grad = None
    with _AtenCounter() as fwd:
        ys = lora_linear_group(*args)
    dys = [torch.randn_like(y) for y in ys]
    with _AtenCounter() as bwd:
        torch.autograd.backward(ys, dys)
    assert not any(op in fwd for op in ("add", "add_", "mul", "mul_", "_to_copy", "cat")), fwd
    assert fwd.get("addmm_", 0) == 3
    # dx: 3 weights + 1 LoRA, in one accumulating chain; dA once, dB's three into one buffer,
    # one scale-and-cast each
    assert not any(op in bwd for op in ("add", "add_", "_to_copy", "cat")), bwd
    assert bwd.get("mul", 0) == 2 and bwd.get("addmm_", 0) == 3, bwd
    assert all(a.lora_A.grad is not None and a.lora_B.grad is not None for a in ads)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_with_grouped_projections_equals_one_op_each(tmp_path, monkeypatch, family):
    """The whole model's loss and LoRA gradients with q/k/v and gate/up grouped equal those
    with one op a projection (fp32: the same products in another order)."""
    model = _tiny_lora_model(tmp_path, family, torch.float32, checkpointing=True, b_std=0.05)
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(10))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    import fastqlora.ops.lora_linear as ll

    monkeypatch.setenv("FASTQLORA_GROUPED_LORA", "1")
    calls = []
    real = ll._LoraGroup.apply
    monkeypatch.setattr(ll._LoraGroup, "apply", lambda *a: calls.append(len(a[1])) or real(*a))
    l_g, g_g = run()
    assert calls.count(3) == 4 and calls.count(2) == 4  # q/k/v and gate/up of 2 layers, forward + recompute
    monkeypatch.setenv("FASTQLORA_GROUPED_LORA", "0")
    calls.clear()
    l_1, g_1 = run()
    assert not calls
    assert abs(l_g - l_1) < 1e-6 * abs(l_1)
    assert max(rel(g_g[n], g_1[n]) for n in g_1) < 1e-5


def test_lora_group_refuses_what_does_not_fit():
    x = torch.randn(3, 64)
    w = [torch.randn(16, 64), torch.randn(8, 64)]
    A, B = [torch.randn(2, 64), torch.randn(2, 64)], [torch.randn(16, 2), torch.randn(8, 2)]
    with pytest.raises(ValueError, match="2 or 3 projections"):
        lora_linear_group(x, w[:1], [None], A[:1], B[:1], 1.0, A[0], B[:1])
    with pytest.raises(ValueError, match="expects 32"):
        lora_linear_group(x, [w[0], torch.randn(8, 32)], [None, None], A, B, 1.0, torch.cat(A), B)
    with pytest.raises(ValueError, match="stacked"):
        lora_linear_group(x, w, [None, None], A, B, 1.0, A[0], B)


# ---- generation: a few rows without gradients go to the NF4 dispatch (the decode kernels) ----

@pytest.mark.parametrize("rows", [1, 3])
def test_decode_rows_take_the_nf4_dispatch(kernel_device, monkeypatch, rows):
    """In generation's steps (decoding(), no_grad), <= 16 rows of an NF4 projection run
    frozen_matmul (LoRA and bias in its epilogue) instead of dequantizing the weight; the result
    is the same projection. With gradients wanted, or outside generation (a checkpointed layer's
    first forward runs without gradients too, and must compute what its recomputation will),
    the autograd op as before."""
    import fastqlora.ops.nf4_linear as nl
    from fastqlora.ops import backend

    monkeypatch.setenv("FASTQLORA_DECODE_KERNELS", "1")
    torch.manual_seed(11)
    dev = kernel_device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    K, N, r, s = 192, 136, 5, 0.5
    w = nf4h.quantize(torch.randn(N, K, device=dev) * 0.05)
    bias = (torch.randn(N, device=dev) * 0.1).to(dtype)
    A, B = torch.randn(r, K, device=dev) * 0.1, torch.randn(N, r, device=dev) * 0.1
    x = torch.randn(1, rows, K, device=dev).to(dtype)
    want = (x.double() @ nf4h.dequantize_oracle(w, torch.float32).double().t() + bias.double()
            + s * (x.double() @ A.double().t()) @ B.double().t())
    calls = []
    real = nl.frozen_matmul
    monkeypatch.setattr(nl, "frozen_matmul", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with backend("triton"), torch.no_grad(), decoding():
        y = lora_linear(x, w, bias, A, B, s)
    assert calls == [(rows, K)]
    assert y.shape == (1, rows, N) and y.dtype == dtype and rel(y, want) < tol
    with backend("triton"), decoding():
        lora_linear(x.requires_grad_(True), w, bias, A, B, s)
    with backend("triton"), torch.no_grad():  # outside generation (a checkpointed layer's first forward)
        lora_linear(x, w, bias, A, B, s)
    monkeypatch.setenv("FASTQLORA_DECODE_KERNELS", "0")
    with backend("triton"), torch.no_grad(), decoding(graphed=True):  # switched off: dequantize + cuBLAS
        lora_linear(x.detach(), w, bias, A, B, s)
    assert len(calls) == 1  # with gradients, outside generation, or switched off: the autograd op
    # unset: the kernels in a step captured as a CUDA graph, not in an eager step
    monkeypatch.delenv("FASTQLORA_DECODE_KERNELS")
    with backend("triton"), torch.no_grad(), decoding():
        lora_linear(x.detach(), w, bias, A, B, s)
    assert len(calls) == 1
    with backend("triton"), torch.no_grad(), decoding(graphed=True):
        lora_linear(x.detach(), w, bias, A, B, s)
    assert len(calls) == 2


def test_decode_steps_with_the_kernels_equal_the_reference(tmp_path, kernel_device, monkeypatch):
    """A tiny 4-bit Llama with LoRA: the logits of a prefill and of one-token decode steps (the
    rows through the NF4 dispatch) equal the reference ops' logits; on the CPU the greedy
    tokens are the same too."""
    import fastqlora.ops.nf4_linear as nl
    from fastqlora.ops import backend

    monkeypatch.setenv("FASTQLORA_DECODE_KERNELS", "1")
    calls = []
    real = nl.frozen_matmul
    monkeypatch.setattr(nl, "frozen_matmul", lambda *a, **k: calls.append((a[0].shape[0], len(a[1]))) or real(*a, **k))
    model = _tiny_lora_model(tmp_path, "llama", torch.float32, checkpointing=False, b_std=0.05)
    model.to(kernel_device).eval()
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 101, (1, 7), generator=g).to(kernel_device)
    steps = torch.randint(0, 101, (3, 1, 1), generator=g).to(kernel_device)

    def logits(mode):
        with backend(mode), torch.no_grad():
            cache = model.allocate_cache(1, 12)
            out = [model.prefill(ids, None, cache)]
            out += [model.decode(t, cache) for t in steps]
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])

    ref, got = logits("reference"), logits("triton")
    # a layer's q/k/v and gate/up each one call (their LoRA thin products one), o and down
    # one each: 4 calls a layer x 2 layers, for the 7-token prefill and each one-token step
    layer = [3, 1, 2, 1]
    assert calls == [(rows, n) for rows in (7, 1, 1, 1) for _ in range(2) for n in layer]
    assert rel(got, ref) < (1e-4 if kernel_device == "cpu" else 2e-2)
    if kernel_device == "cpu":  # no reduced-precision products: the same greedy tokens
        with backend("reference"):
            want = model.generate(ids, max_new_tokens=6, do_sample=False)
        with backend("triton"):
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_grouped_switch_and_cast_group_refuse_bad_input(monkeypatch):
    from fastqlora.ops.dispatch import decode_kernels_enabled, grouped_lora_enabled

    monkeypatch.setenv("FASTQLORA_GROUPED_LORA", "yes")
    with pytest.raises(ValueError, match="FASTQLORA_GROUPED_LORA"):
        grouped_lora_enabled()
    monkeypatch.setenv("FASTQLORA_DECODE_KERNELS", "on")
    with pytest.raises(ValueError, match="FASTQLORA_DECODE_KERNELS"):
        decode_kernels_enabled()
    with pytest.raises(ValueError, match="at least one adapter"):
        cast_group([], torch.bfloat16)
