"""FastLanguageModel.for_training(model, cuda_graph=True): a training forward's loss and its
backward replayed together from a CUDA graph (train/graphed_loss.py), for loops that step
their own optimizer. On the CPU the same path runs without a capture (the batch padded to a
bucket, boundaries from the host, the gradients computed in the forward and handed over in
the backward): the plain forward's loss and gradients, right padding and packed rows alike;
on the GPU the replays against eager steps."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import packed_batch as _packed
from helpers import rel_err
from helpers import right_padded_batch as _padded
from helpers import tiny_lora_model as _model

from fastqlora import FastLanguageModel
from fastqlora.ops import backend


def _grads(model, batch, scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [_padded, _packed])
def test_the_graphed_path_gives_the_plain_loss_and_gradients(tmp_path, kernel_device, make):
    model = _model(tmp_path, kernel_device)
    twin = copy.deepcopy(model)
    FastLanguageModel.for_training(twin, cuda_graph=True, bucket=16, capture=False)
    batch = make(kernel_device)
    with backend("triton"):
        want, wg = _grads(model, batch, scale=0.5)  # a loss divided for accumulation
        got, gg = _grads(twin, batch, scale=0.5)
        got2, gg2 = _grads(twin, dict(batch, num_items_in_batch=torch.tensor(7, device=kernel_device)))
        want2, wg2 = _grads(model, dict(batch, num_items_in_batch=torch.tensor(7, device=kernel_device)))
    entry = next(iter(twin._graphed_loss.entries.values()))
    assert entry.static["input_ids"].shape[1] % 16 == 0 and entry.calls == 2  # padded to the bucket
    tol = 1e-5 if kernel_device == "cpu" else 1e-4
    for (w, wgr), (g, ggr) in (((want, wg), (got, gg)), ((want2, wg2), (got2, gg2))):
        assert rel_err(g, w) < tol
        assert all(rel_err(ggr[k], wgr[k]) < 10 * tol for k in wgr)


def test_graphs_all_taken_a_somewhat_narrower_batch_pads_up_to_one(tmp_path, kernel_device):
    """With every graph slot taken (max_graphs=1 here), a batch at most a third narrower than a
    graph's width is padded up to it and takes that graph, with the plain forward's loss and
    gradients; a much narrower or a wider one runs eagerly (no entry is made)."""
    model = _model(tmp_path, kernel_device)
    twin = copy.deepcopy(model)
    FastLanguageModel.for_training(twin, cuda_graph=True, bucket=8, max_graphs=1, capture=False)
    graphed = twin._graphed_loss
    wide = _padded(kernel_device, seq=20)  # 24 wide after the bucket
    with backend("triton"):
        _grads(twin, wide)
        (key,) = graphed.entries
        assert key[1] == 24
        narrower = _padded(kernel_device, seed=1, seq=15)  # 16 wide: 24 <= 4/3 x 16 is not true
        assert graphed(narrower) is None
        close = _padded(kernel_device, seed=2, seq=18)  # 24 wide after the bucket: the same key
        assert graphed(close) is not None
        entry = graphed.entries[key]
        calls = entry.calls
        near = _padded(kernel_device, seed=3, seq=19, rows=2)  # another height: eager
        assert graphed(near) is None and entry.calls == calls
    twin2 = copy.deepcopy(model)
    FastLanguageModel.for_training(twin2, cuda_graph=True, bucket=4, max_graphs=1, capture=False)
    g2 = twin2._graphed_loss
    first = _padded(kernel_device, seq=20)  # 20 wide
    second = _padded(kernel_device, seed=4, seq=16)  # 16 wide: 20 <= 4/3 x 16, so it pads up to 20
    with backend("triton"):
        _grads(twin2, first)
        want, wg = _grads(model, second)
        got, gg = _grads(twin2, second)
    (only,) = g2.entries.values()
    assert len(g2.entries) == 1 and only.calls == 2 and only.static["input_ids"].shape == (3, 20)
    tol = 1e-5 if kernel_device == "cpu" else 1e-4
    assert rel_err(got, want) < tol and all(rel_err(gg[k], wg[k]) < 10 * tol for k in wg)
    wider = _padded(kernel_device, seed=5, seq=24)  # wider than every graph: eager
    with backend("triton"):
        assert g2(wider) is None


def test_what_runs_eagerly_and_what_is_refused(tmp_path):
    model = _model(tmp_path)
    FastLanguageModel.for_training(model, cuda_graph=True, capture=False)
    graphed = model._graphed_loss
    b = _padded("cpu")
    left = dict(b, attention_mask=b["attention_mask"].flip(1))  # left padding: eager
    assert graphed(left) is None
    counted_padding = dict(b, labels=b["input_ids"])  # labels on the padding: eager
    assert graphed(counted_padding) is None
    assert graphed(dict(b, output_hidden_states=True)) is None  # an input it does not know
    loss = model(**b).loss  # graphed
    model(**b).loss.backward()  # a second forward of the shape overwrote the first's gradients
    with pytest.raises(RuntimeError, match="overwritten by a later graphed forward"):
        loss.backward()
    with torch.no_grad():  # evaluation runs the plain forward
        assert model(**b).loss is not None and model(**b).loss.grad_fn is None
    FastLanguageModel.for_training(model, cuda_graph=False)
    assert model._graphed_loss is None
    with pytest.raises(ValueError, match="positive"):
        FastLanguageModel.for_training(model, cuda_graph=True, bucket=0)
    with pytest.raises(TypeError, match="bucket must be an int"):
        FastLanguageModel.for_training(model, cuda_graph=True, bucket="128")


@pytest.mark.gpu
def test_replayed_loss_and_gradients_on_the_gpu(tmp_path):
    """bf16 on the GPU, AdamW stepping outside: six steps of two batch shapes (each shape's two
    warm-up calls, its capture, replays) give the eager steps' losses and adapters within bf16
    rounding; the graphs were captured."""
    model = _model(tmp_path, "cuda", torch.bfloat16)
    twin = copy.deepcopy(model)
    FastLanguageModel.for_training(twin, cuda_graph=True)
    batches = [_padded("cuda", seed=i, seq=13 if i % 2 else 140) for i in range(10)]  # two buckets

    def train(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for b in batches:
            loss = m(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        return losses

    want, got = train(model), train(twin)
    assert all(e.graph is not None for e in twin._graphed_loss.entries.values())
    assert len(twin._graphed_loss.entries) == 2
    assert got == pytest.approx(want, rel=2e-2)
    a = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    assert max(rel_err(b[k], a[k]) for k in a) < 2e-2


def test_transformers_trainer_with_accumulation_trains_alike(tmp_path):
    """transformers' Trainer, two micro-batches a step and clipping, with and without the graphed
    path (its CPU emulation): the same adapters after three steps."""
    from transformers import Trainer, TrainingArguments

    from fastqlora.demo import data_dir

    g = torch.Generator().manual_seed(4)
    rows = [{"input_ids": (ids := torch.randint(3, 300, (24,), generator=g)), "labels": ids.clone()}
            for _ in range(12)]
    adapters = []
    for graph in (False, True):
        model, _ = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True,
                                                     device="cpu", dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
        FastLanguageModel.for_training(model, cuda_graph=graph)
        args = TrainingArguments(output_dir=str(tmp_path / str(graph)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, report_to=[],
                                 save_strategy="no", use_cpu=True, max_grad_norm=0.5)
        Trainer(model=model, args=args, train_dataset=rows).train()
        if graph:
            assert sum(e.calls for e in model._graphed_loss.entries.values()) == 6  # every micro-batch
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, graphed = adapters
    assert max(rel_err(graphed[k], plain[k]) for k in plain) < 1e-4
