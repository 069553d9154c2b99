"""The layer loop's three modes give the same loss and LoRA gradients bit for bit, and
tiled_apply matches the untiled function while storing only its input and output."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_decoder import ToyModel, clone_with, micro_batch, train_steps

from fastqlora.checkpointing import resolve_mode, run_layers
from fastqlora.offload import OffloadArenaCache
from fastqlora.tiling import choose_tile_tokens, tiled_apply

# Steps of gradient accumulation; each micro-batch is a list of packed rows (sequence lengths).
# Uneven micro-batches, and the length changes within and between steps.
STEPS = [
    [[[5, 4]], [[3, 6, 4]], [[2]]],
    [[[7, 9], [16]], [[4, 4]]],
    [[[3]]],
]
MODES = ["off", True, "offload", "unsloth"]


def _assert_same(run_a, run_b):
    (la, ga), (lb, gb) = run_a, run_b
    assert len(la) == len(lb) and all(torch.equal(a, b) for a, b in zip(la, lb))
    for step_a, step_b in zip(ga, gb):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b), (a - b).abs().max()


def _runs(base: ToyModel, device="cpu"):
    out = {}
    for mode in MODES:
        cache = OffloadArenaCache(token_quantum=4) if mode in ("offload", "unsloth") else None
        model = clone_with(base, mode, cache).to(device)
        out[str(mode)] = train_steps(model, STEPS)
        micro = sum(len(step) for step in STEPS)
        # plain autograd runs each layer once a micro-batch; checkpointing runs it again in backward
        assert all(layer.calls == micro * (1 if mode == "off" else 2) for layer in model.layers)
        if cache is not None:  # the offload really went through the host, each checkpoint once
            native = cache.arenas[0].native
            assert len(cache.arenas) == 1 and not cache.arenas[0].leased
            assert native.offloads == native.prefetches == micro * (len(model.layers) - 1)
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_embedding", [False, True])
def test_modes_equal_bit_for_bit(dropout, train_embedding):
    torch.manual_seed(0)
    base = ToyModel(dropout=dropout, train_embedding=train_embedding)
    runs = _runs(base)
    for mode in MODES[1:]:
        _assert_same(runs["off"], runs[str(mode)])
    # the gradients are real: nonzero for every trainable tensor
    assert all(g.abs().sum() > 0 for g in runs["off"][1][0])


def test_dropout_really_drops():
    torch.manual_seed(0)
    base = ToyModel(dropout=0.3)
    l1, _ = train_steps(clone_with(base, "off"), STEPS[:1], seed=0)
    l2, _ = train_steps(clone_with(base, "off"), STEPS[:1], seed=1)
    assert not torch.equal(torch.stack(l1), torch.stack(l2))


def test_two_live_graphs_take_two_arenas():
    torch.manual_seed(0)
    base_a, base_b = ToyModel(layers=4, dropout=0.2), ToyModel(layers=6, hidden=16, dropout=0.2)
    ref = {}
    for name, base in (("a", base_a), ("b", base_b)):
        ref[name] = []
        m = clone_with(base, "off")
        torch.manual_seed(5)
        for k, lengths in enumerate(([[6, 5]], [[12]])):
            m(*micro_batch(k, lengths)).backward()
        ref[name] = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    caches = OffloadArenaCache(token_quantum=1), OffloadArenaCache(token_quantum=1)
    ma, mb = clone_with(base_a, "offload", caches[0]), clone_with(base_b, "offload", caches[1])
    # per model: both micro-batches forward before either backward (two live graphs at once)
    got = {"a": ma, "b": mb}
    for name, m in got.items():
        torch.manual_seed(5)
        losses = []
        for k, lengths in enumerate(([[6, 5]], [[12]])):
            losses.append(m(*micro_batch(k, lengths)))
        for loss in losses:  # two live graphs of one model: the second forward leases a second arena
            loss.backward()
    for name, m in got.items():
        for g, r in zip([p.grad for p in m.parameters() if p.requires_grad], ref[name]):
            assert torch.equal(g, r)
    assert caches[0].arenas[0].native.host_ptr != caches[1].arenas[0].native.host_ptr
    assert len(caches[0].arenas) == 2 and not any(a.leased for a in caches[0].arenas)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_interleaved_models_match_separate_runs(device):
    torch.manual_seed(1)
    base_a, base_b = ToyModel(layers=3), ToyModel(layers=4, hidden=20)
    batch = micro_batch(3, [[4, 7]], device=device)
    refs = []
    for base in (base_a, base_b):
        m = clone_with(base, "off").to(device)
        m(*batch).backward()
        refs.append([p.grad for p in m.parameters() if p.requires_grad])
    ma, mb = clone_with(base_a, "offload").to(device), clone_with(base_b, "offload").to(device)  # default caches
    la, lb = ma(*batch), mb(*batch)
    lb.backward()
    la.backward()
    for m, ref in zip((ma, mb), refs):
        assert all(torch.equal(p.grad, r) for p, r in zip([p for p in m.parameters() if p.requires_grad], ref))


def test_backward_through_autograd_grad_and_input_grad():
    torch.manual_seed(2)
    layers = nn.ModuleList(ToyModel(layers=3).layers)
    ctx = micro_batch(0, [[5, 6]])[1]
    x = torch.randn(1, 11, 24, requires_grad=True)
    params = [p for p in layers.parameters() if p.requires_grad]
    want = None
    for mode in ("off", "checkpoint", "offload"):
        out = run_layers(layers, x, ctx, mode, arena_cache=OffloadArenaCache())
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
        if want is None:
            want = grads
        assert all(torch.equal(a, b) for a, b in zip(grads, want))


def test_backward_that_stops_early_still_returns_the_arena():
    torch.manual_seed(3)
    cache = OffloadArenaCache()
    m = ToyModel(layers=4, mode="offload", arena_cache=cache)
    loss = m(*micro_batch(0, [[8]]))
    top = [p for p in m.layers[-1].parameters() if p.requires_grad]
    torch.autograd.grad(loss, top)  # backward runs the top layer only; it fetched layer 2 ahead
    assert cache.arenas[0].leased and cache.arenas[0].native.prefetches == 1
    del loss
    assert not cache.arenas[0].leased  # the graph died: the arena is back, the fetched input dropped


def test_retain_graph_twice_offload_raises_clearly():
    torch.manual_seed(3)
    m = ToyModel(layers=3, mode="offload", arena_cache=OffloadArenaCache())
    loss = m(*micro_batch(0, [[8]]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_no_grad_and_frozen_layers_take_no_arena():
    torch.manual_seed(4)
    cache = OffloadArenaCache()
    m = ToyModel(layers=3, mode="offload", arena_cache=cache)
    with torch.no_grad():
        m(*micro_batch(0, [[8]]))
    assert cache.arenas == []
    # only the top layer trains: the layers below run plainly, no slot is used for them
    for layer in m.layers[:-1]:
        for p in layer.parameters():
            p.requires_grad_(False)
    m(*micro_batch(0, [[8]])).backward()
    assert cache.arenas[0].native.offloads == 0 and not cache.arenas[0].leased


def test_layer_error_releases_the_arena_and_odd_inputs_stay_on_device():
    torch.manual_seed(5)
    cache = OffloadArenaCache()
    layers = ToyModel(layers=4).layers
    ctx = micro_batch(0, [[9]])[1]
    wide = torch.randn(1, 9, 30)
    x = wide[..., :24]  # not contiguous: its checkpoint stays on the device, the rest go to the host
    params = [p for p in layers.parameters() if p.requires_grad]
    want = torch.autograd.grad(run_layers(layers, x, ctx, "off").sum(), params)
    got = torch.autograd.grad(run_layers(layers, x, ctx, "offload", cache).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert cache.arenas[0].native.offloads == 2 and not cache.arenas[0].leased
    layers[2].forward = lambda hidden, ctx: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run_layers(layers, x.contiguous(), ctx, "offload", cache)
    assert len(cache.arenas) == 1 and not cache.arenas[0].leased


def test_resolve_mode():
    assert resolve_mode(True) == "checkpoint" and resolve_mode(False) == "off"
    assert resolve_mode("offload") == resolve_mode("unsloth") == "offload"
    for bad in ("Offload", "true", 1, None, "gradient"):
        with pytest.raises(ValueError, match="unsloth"):
            resolve_mode(bad)


# ---------------------------------------------------------------------------------------
# tiled_apply on a plain per-token MLP

class TokenMLP(nn.Module):
    def __init__(self, hidden=12, inner=40, dropout=0.0):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.up.weight.requires_grad_(False)  # one frozen, the rest trainable
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.down(self.dropout(torch.nn.functional.silu(self.up(x))))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape,tile", [((3, 37, 12), 8), ((53, 12), 16), ((2, 5, 12), 3)])
def test_tiled_apply_matches_untiled(shape, tile):
    torch.manual_seed(0)
    mlp = TokenMLP()
    x = torch.randn(shape, requires_grad=True)
    gy = torch.randn(shape)
    y_ref = mlp(x)
    g_ref = torch.autograd.grad(y_ref, [x, *[p for p in mlp.parameters() if p.requires_grad]], gy)
    y = tiled_apply(mlp, x, tile)
    g = torch.autograd.grad(y, [x, *[p for p in mlp.parameters() if p.requires_grad]], gy)
    assert y.shape == y_ref.shape and _rel(y, y_ref) < 1e-6
    for a, b in zip(g, g_ref):  # fp32; parameter grads are sums over tiles
        assert torch.isfinite(a).all() and _rel(a, b) < 1e-5


def test_tiled_apply_stores_only_input_and_output():
    torch.manual_seed(0)
    mlp = TokenMLP(hidden=12, inner=40)
    x = torch.randn(64, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = tiled_apply(mlp, x, 16)
    trainable = [tuple(p.shape) for p in mlp.parameters() if p.requires_grad]
    assert sorted(saved) == sorted([(64, 12), *trainable])  # x and the parameters: no (tokens, inner)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        mlp(x)
    assert (64, 40) in saved  # the untiled MLP does keep its intermediates
    y.sum().backward()
    assert x.grad is not None and mlp.down.weight.grad is not None


def test_tiled_apply_replays_dropout():
    torch.manual_seed(0)
    mlp = TokenMLP(dropout=0.5)
    x = torch.randn(30, 12, requires_grad=True)
    params = [x, *[p for p in mlp.parameters() if p.requires_grad]]
    torch.manual_seed(9)
    y = tiled_apply(mlp, x, 7)
    g = torch.autograd.grad(y.square().sum(), params)
    after = torch.rand(3)
    # reference: the same tiles in the same order with grad on, from the same RNG state
    torch.manual_seed(9)
    y_ref = torch.cat([mlp(x[s:s + 7]) for s in range(0, 30, 7)])
    g_ref = torch.autograd.grad(y_ref.square().sum(), params)
    assert torch.equal(after, torch.rand(3))  # backward's replay left the RNG stream alone
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-5


def test_tiled_apply_per_token_loss_with_labels():
    torch.manual_seed(0)
    head = nn.Linear(12, 33, bias=False)  # frozen lm_head; x gets the gradient
    head.weight.requires_grad_(False)
    x = torch.randn(2, 29, 12, requires_grad=True)
    labels = torch.randint(0, 33, (2, 29))
    labels[0, :5] = -100

    def token_loss(h, lab):
        return nn.functional.cross_entropy(head(h).float(), lab, reduction="none")

    ref = nn.functional.cross_entropy(head(x).flatten(0, 1), labels.flatten(), reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, [x])
    per_token = tiled_apply(token_loss, x, 8, aux=[labels])
    assert per_token.shape == (2, 29)
    (g,) = torch.autograd.grad(per_token.sum(), [x])
    assert _rel(per_token.sum(), ref) < 1e-6 and _rel(g, g_ref) < 1e-6
    with pytest.raises(ValueError, match="token"):
        tiled_apply(token_loss, x, 8, aux=[labels[:, :5]])


def test_tiled_apply_paths_and_heuristic():
    mlp = TokenMLP()
    x = torch.randn(20, 12)
    with torch.no_grad():
        assert _rel(tiled_apply(mlp, x, 6), mlp(x)) < 1e-6
    assert torch.equal(tiled_apply(mlp, x, 64), mlp(x))  # one tile: a direct call
    assert choose_tile_tokens(100_000, 150_000, 1 << 30) == 6912  # 1 GiB / 150 KB = 7158, in 256s
    assert choose_tile_tokens(2048, 150_000, 1 << 30) == 2048
    assert choose_tile_tokens(100_000, 1 << 30, 1 << 20) == 256
    with pytest.raises(ValueError):
        tiled_apply(mlp, x, 0)
