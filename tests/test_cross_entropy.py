"""Fused lm_head + cross-entropy against the materialized reference (float64 for fp32)."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from fastqlora.ops import backend
from fastqlora.ops import cross_entropy as ce_mod
from fastqlora.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _case(n, h, v, dtype, device, seed, ignore_frac=0.2, train_head=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.2).to(device, dtype).requires_grad_(train_head)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, labels.to(device)


@pytest.mark.parametrize("softcap", [None, 7.5], ids=["plain", "softcap"])
@pytest.mark.parametrize("mode", ["mean", "sum", "num_items", "num_items_tensor"])
def test_matches_reference(kernel_device, mode, softcap, monkeypatch):
    v = 32003 if kernel_device == "cuda" else 1003
    # force several chunks so the chunk loop and the global mean are exercised
    monkeypatch.setattr(ce_mod, "_chunk_rows", lambda vocab, itemsize, device: 7)
    for dtype in _dtypes(kernel_device):
        hidden, weight, labels = _case(37, 45, v, dtype, kernel_device, seed=3, train_head=True)
        kw = dict(softcap=softcap)
        if mode == "num_items":
            kw["num_items"] = 50
        elif mode == "num_items_tensor":  # transformers' Trainer passes a device tensor
            kw["num_items"] = torch.tensor(50, device=kernel_device)
            mode = "num_items"
        else:
            kw["reduction"] = mode
        with backend("triton"):
            loss = linear_cross_entropy(hidden, weight, labels, **kw)
        (loss * 1.7).backward()
        ref_dtype = torch.float64 if dtype == torch.float32 else dtype
        h2 = hidden.detach().to(ref_dtype).requires_grad_(True)
        w2 = weight.detach().to(ref_dtype).requires_grad_(True)
        ref = linear_cross_entropy_reference(h2, w2, labels, **kw)
        if ref_dtype == torch.float64:  # the reference upcasts logits to fp32; keep float64 here
            logits = h2 @ w2.t()
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                    reduction="sum" if mode != "mean" else "mean")
            if mode == "num_items":
                ref = ref / 50
        (ref * 1.7).backward()
        tol = TOL[dtype]
        assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
        assert rel_err(hidden.grad, h2.grad) < tol * 3
        assert rel_err(weight.grad, w2.grad) < tol * 3


def test_single_row_and_frozen_head(kernel_device):
    hidden, weight, labels = _case(1, 33, 517, torch.float32, kernel_device, 4, ignore_frac=0.0)
    with backend("triton"):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    h2 = hidden.detach().requires_grad_(True)
    ref = linear_cross_entropy_reference(h2, weight, labels)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert rel_err(hidden.grad, h2.grad) < 1e-5 and weight.grad is None


def test_the_mean_is_taken_without_reading_the_count_back(kernel_device):
    """The mean's 1/count stays on the device (a readback would stall the host's launches
    and forbid capturing the step as a CUDA graph): no scalar leaves the device in forward
    or backward, and a batch with no counted token gives nan, as torch's mean does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Readbacks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("aten::_local_scalar_dense", "aten::item", "aten::nonzero"):
                self.seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    hidden, weight, labels = _case(23, 33, 517, torch.float32, kernel_device, 5)
    spy = Readbacks()
    with backend("triton"), spy:
        loss = linear_cross_entropy(hidden, weight, labels)
        loss.backward()
        tensor_items = linear_cross_entropy(hidden, weight, labels, num_items=torch.tensor(17, device=kernel_device))
    assert spy.seen == []
    assert loss.shape == () and tensor_items.shape == ()
    ref = linear_cross_entropy_reference(hidden.detach(), weight, labels)
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    with backend("triton"):
        none = linear_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    assert torch.isnan(none)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_llama3_vocab_bf16(dtype):
    hidden, weight, labels = _case(777, 4096, 128256, dtype, "cuda", 5)
    with backend("triton"):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    h2 = hidden.detach().requires_grad_(True)
    ref = linear_cross_entropy_reference(h2, weight, labels)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    assert rel_err(hidden.grad, h2.grad) < 1e-2
