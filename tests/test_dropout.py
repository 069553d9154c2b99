"""LoRA dropout on the device counters (ops/dropout.py inside counting(), the kernel of
triton_kernels/dropout.py): the mask's properties (kept share, scale, a fresh mask a call,
the same one for the same seed), the backward against the forward's own mask, and a
recomputation that draws its forward's masks again (checkpointed and plain models give the
same loss and gradients, also with two forwards before one backward); outside counting()
it is torch's dropout. Under TRITON_INTERPRET=1 on the CPU, or on the GPU."""
from __future__ import annotations

import math

import pytest
import torch

from fastqlora import FastLanguageModel
from fastqlora.demo import data_dir
from fastqlora.ops import backend
from fastqlora.ops import dropout as lora_dropout_state
from fastqlora.ops.dropout import lora_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mask_scale_share_and_backward(kernel_device, dtype):
    p = 0.3
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(7, 2909, generator=g) + 0.5).to(kernel_device, dtype)  # no zeros; not a multiple of 1024
    x.requires_grad_(True)
    lora_dropout_state.manual_seed(11)
    with backend("triton"), lora_dropout_state.counting():
        y = lora_dropout(x, p)
        dy = torch.randn(x.shape, generator=g).to(kernel_device, dtype)
        (dx,) = torch.autograd.grad(y, x, dy)
    kept = y != 0
    n = x.numel()
    share = kept.float().mean().item()
    assert abs(share - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    want = x.detach().float() / (1 - p)
    assert torch.allclose(y[kept].float(), want[kept], rtol=tol, atol=0)
    # backward: the same mask, drawn again from the call's seed, and the same scale
    assert torch.equal(dx == 0, ~kept)
    assert torch.allclose(dx[kept].float(), dy[kept].float() / (1 - p), rtol=tol, atol=0)


def test_seeded_calls_repeat_and_successive_calls_differ(kernel_device):
    x = torch.ones(3, 1500, device=kernel_device)
    with backend("triton"), lora_dropout_state.counting():
        lora_dropout_state.manual_seed(5)
        a, b = lora_dropout(x, 0.5) != 0, lora_dropout(x, 0.5) != 0
        lora_dropout_state.manual_seed(5)
        a2 = lora_dropout(x, 0.5) != 0
        lora_dropout_state.manual_seed(6)
        c = lora_dropout(x, 0.5) != 0
    assert torch.equal(a, a2)
    n = x.numel()
    for other in (b, c):  # independent masks: both kept ~1/4 of the time
        both = (a & other).float().mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    assert torch.equal(lora_dropout(x, 0.0), x) and torch.equal(lora_dropout(x, 0.5, training=False), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        lora_dropout(x, 1.0)


def test_draws_of_one_philox_call_are_independent(kernel_device):
    """The kernel gives the eight 16-bit halves of a Philox call to elements BLOCK/8 apart:
    masks at those distances (and neighbours) are kept together a quarter of the time at
    p = 0.5, as independent draws are."""
    from fastqlora.triton_kernels.dropout import _BLOCK

    x = torch.ones(3 * _BLOCK + 77, device=kernel_device)
    with backend("triton"), lora_dropout_state.counting():
        lora_dropout_state.manual_seed(17)
        kept = lora_dropout(x, 0.5) != 0
    q = _BLOCK // 8
    for gap in (1, q, 2 * q, 4 * q):
        both = (kept[:-gap] & kept[gap:]).float().mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / (x.numel() - gap)), gap


def test_outside_counting_it_is_torchs_dropout(kernel_device):
    """Eager training (no counting block) keeps torch's one-op dropout and its generator."""
    x = torch.randn(4, 999, device=kernel_device)
    with backend("triton"):
        torch.manual_seed(2)
        got = lora_dropout(x, 0.4)
    torch.manual_seed(2)
    assert torch.equal(got, torch.nn.functional.dropout(x, 0.4))


def test_counter_state_round_trips(kernel_device):
    with backend("triton"), lora_dropout_state.counting():
        lora_dropout_state.manual_seed(3)
        lora_dropout(torch.ones(10, device=kernel_device), 0.5)
        state = lora_dropout_state.get_state()
        want = lora_dropout(torch.ones(4000, device=kernel_device), 0.5)
        lora_dropout_state.set_state(state)
        got = lora_dropout(torch.ones(4000, device=kernel_device), 0.5)
    assert torch.equal(got, want)
    if not torch.cuda.is_available():  # a GPU run's checkpoint resumed here: its counter is skipped
        lora_dropout_state.set_state({"cuda:0": 5, **state})
        assert "cuda:0" not in lora_dropout_state.get_state()


def _model(device):
    model, _ = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True, device=device,
                                                 dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return model


def test_recomputation_draws_the_forwards_masks(kernel_device):
    """Checkpointed layers recompute with the masks their forward drew (the counter rewound
    and put back), also when a second forward ran before the backward (the first forward's
    recomputation must not take the second's seeds): the plain model's loss and gradients."""
    model = _model(kernel_device)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 400, (2, 37), generator=g).to(kernel_device) for _ in range(2)]
    results = {}
    for mode in ("off", "checkpoint"):
        model.gradient_checkpointing = mode
        model.zero_grad(set_to_none=True)
        lora_dropout_state.manual_seed(9)
        with backend("triton"), lora_dropout_state.counting():
            loss = model(input_ids=ids[0], labels=ids[0]).loss + model(input_ids=ids[1], labels=ids[1]).loss
            loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad],
                         lora_dropout_state.get_state())
    (l0, g0, s0), (l1, g1, s1) = results["off"], results["checkpoint"]
    assert s1 == s0  # the recomputations put the counter back where the forwards left it
    assert torch.allclose(l1, l0, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g1, g0))
    # every adapter drew once a forward, from the counter (two forwards)
    from fastqlora.lora import LoraAdapter

    adapters = sum(isinstance(m, LoraAdapter) for m in model.modules())
    lora_dropout_state.manual_seed(9)
    start = lora_dropout_state.get_state()
    assert {d: s0[d] - start[d] for d in s0} == {d: 2 * adapters for d in s0} and adapters > 0


@pytest.mark.gpu
def test_a_captured_call_replays_the_eager_masks():
    """Captured in a CUDA graph, each replay advances the device counter: replay k drops what
    the k-th eager call from the same seed drops (and the backward's mask is the forward's)."""
    x = torch.ones(5, 3001, device="cuda", requires_grad=True)
    w = torch.arange(x.numel(), device="cuda", dtype=torch.float32).reshape(x.shape) / x.numel()

    def call():  # y and dx = w·mask/(1 − p)
        y = lora_dropout(x, 0.25)
        (dx,) = torch.autograd.grad((y * w).sum(), x)
        return y, dx

    lora_dropout_state.manual_seed(21)
    with lora_dropout_state.counting():
        eager = [tuple(t.detach().clone() for t in call()) for _ in range(4)]
        lora_dropout_state.manual_seed(21)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager call first, as a graphed step's warm-up
            first = tuple(t.detach().clone() for t in call())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, dx = call()
    replays = [first]
    for _ in range(3):
        graph.replay()
        replays.append((y.detach().clone(), dx.clone()))
    for (ye, de), (yr, dr) in zip(eager, replays):
        assert torch.equal(ye, yr) and torch.equal(de, dr)
    assert not torch.equal(eager[1][0], eager[2][0])
