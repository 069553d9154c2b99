"""FastLanguageModel.for_training(model, cuda_graph=True): ``model.base_model(...)`` (what
trl's SFTTrainer calls before its own fused LM head) replays the backbone's forward and its
backward from two CUDA graphs (train/graphed_backbone.py). On the CPU the same path runs
without a capture (the batch padded to a bucket, boundaries from the host, the backward
through the padded batch): the plain backbone's hidden states and gradients, right padding
and packed rows alike, and two widths in one bucket; trl's SFTTrainer trains to the same
adapters; on the GPU the replays against eager steps."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_batch, rel_err, right_padded_batch, tiny_lora_model

from fastqlora import FastLanguageModel
from fastqlora.ops import backend

HEAD = torch.randn(101, 64, generator=torch.Generator().manual_seed(9))


def _head_loss(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What trl does with the hidden states: the next token's cross-entropy through a head."""
    logits = h[:, :-1].float() @ HEAD.to(h.device).T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _demo_model(graph: bool):
    """The bundled demo model in fp32 with LoRA, the graphed paths on (their CPU emulation) or off."""
    from fastqlora.demo import data_dir

    model, tok = FastLanguageModel.from_pretrained(str(data_dir() / "demo_model"), load_in_4bit=True, device="cpu",
                                                   dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    FastLanguageModel.for_training(model, cuda_graph=graph, capture=False)
    return model, tok


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    h = model.base_model(**inputs, use_cache=False).last_hidden_state
    _head_loss(h, batch["labels"]).backward()
    valid = batch["labels"] != -100
    return h.detach()[valid], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_graphed_backbone_gives_the_plain_hidden_states_and_gradients(tmp_path, kernel_device):
    model = tiny_lora_model(tmp_path, kernel_device)
    twin = copy.deepcopy(model)
    FastLanguageModel.for_training(twin, cuda_graph=True, bucket=64, capture=False)
    # two widths in one bucket (the narrower one after the wider), then packed rows
    batches = [right_padded_batch(kernel_device, seed=1, seq=40), right_padded_batch(kernel_device, seed=2, seq=13),
               packed_batch(kernel_device)]
    tol = 1e-5 if kernel_device == "cpu" else 1e-4
    with backend("triton"):
        for batch in batches:
            want, wg = _step(model, batch)
            got, gg = _step(twin, batch)
            assert rel_err(got, want) < tol
            assert all(rel_err(gg[k], wg[k]) < 10 * tol for k in wg)
    entries = twin._graphed_backbone.entries
    assert sorted(e.calls for e in entries.values()) == [1, 2]  # every batch took the path
    assert all(k[1] == 64 for k in entries)  # padded to the bucket


def test_what_runs_eagerly_and_what_is_refused(tmp_path):
    model = tiny_lora_model(tmp_path)
    FastLanguageModel.for_training(model, cuda_graph=True, capture=False)
    graphed = model._graphed_backbone
    b = {k: v for k, v in right_padded_batch("cpu").items() if k != "labels"}
    assert graphed(dict(b, attention_mask=b["attention_mask"].flip(1))) is None  # left padding
    assert graphed(dict(b, output_hidden_states=True)) is None  # an input it does not know
    assert graphed(dict(b, cu_seq_lens_q=torch.tensor([0, 13]))) is None  # boundaries without positions
    h = model.base_model(**b, output_attentions=False).last_hidden_state  # graphed: False asks for nothing
    assert h.grad_fn is not None and graphed.entries
    model.base_model(**b).last_hidden_state.sum().backward()  # a second forward of the shape
    with pytest.raises(RuntimeError, match="overwritten by a later graphed forward"):
        h.sum().backward()
    with torch.no_grad():  # evaluation runs the plain backbone
        assert model.base_model(**b).last_hidden_state.grad_fn is None
    FastLanguageModel.for_training(model, cuda_graph=False)
    assert model._graphed_backbone is None and model._graphed_loss is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="trains on the CPU, where trl's own Triton kernel needs TRITON_INTERPRET=1")
def test_trl_sft_trainer_trains_alike(tmp_path):
    """trl's SFTTrainer (its fused LM head on base_model's hidden states) with and without the
    graphed backbone (its CPU emulation): every training forward takes the path, and the
    adapters after three steps are the plain ones."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    ds = datasets.Dataset.from_list([{"text": f"The capital of Spain is Madrid. Number {i * 7}."} for i in range(6)])
    adapters = []
    for graph in (False, True):
        model, tok = _demo_model(graph)
        cfg = trl.SFTConfig(output_dir=str(tmp_path / str(graph)), per_device_train_batch_size=2, max_steps=3,
                            learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                            max_length=64, seed=3, bf16=False)  # fp32: the paths equal within rounding
        trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok).train()
        if graph:
            assert sum(e.calls for e in model._graphed_backbone.entries.values()) == 3
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, graphed = adapters
    assert max(rel_err(graphed[k], plain[k]) for k in plain) < 1e-4


@pytest.mark.gpu
def test_replayed_backbone_on_the_gpu(tmp_path):
    """bf16 on the GPU, AdamW stepping outside, the previous step's hidden states and loss
    still referenced during the next forward (as a loop's variables are): ten steps of two
    batch shapes (each shape's two warm-up calls, its capture, replays) give the eager steps'
    losses and adapters within bf16 rounding; the graphs were captured."""
    model = tiny_lora_model(tmp_path, "cuda", torch.bfloat16)
    twin = copy.deepcopy(model)
    FastLanguageModel.for_training(twin, cuda_graph=True)
    batches = [right_padded_batch("cuda", seed=i, seq=13 if i % 2 else 140) for i in range(10)]

    def train(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for b in batches:
            h = m.base_model(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state
            loss = _head_loss(h, b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    want, got = train(model), train(twin)
    entries = twin._graphed_backbone.entries
    assert len(entries) == 2 and all(e.forward is not None for e in entries.values())
    assert got == pytest.approx(want, rel=2e-2)
    a = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    assert max(rel_err(b[k], a[k]) for k in a) < 2e-2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="trains on the CPU, where trl's own Triton kernel needs TRITON_INTERPRET=1")
def test_trl_dpo_trainer_trains_alike(tmp_path):
    """trl's DPOTrainer (chosen and rejected in one forward through base_model, the reference
    log-probs precomputed under no_grad, which stays eager): the same losses with the graphed
    backbone's CPU emulation as without, every training forward through it."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    data = datasets.Dataset.from_list([{"prompt": "Capital of Peru?", "chosen": " Lima.", "rejected": " Paris."},
                                       {"prompt": "Capital of Chile?", "chosen": " Santiago.",
                                        "rejected": " Rome."}] * 3)
    losses = []
    for graph in (False, True):
        model, tok = _demo_model(graph)
        args = trl.DPOConfig(output_dir=str(tmp_path / str(graph)), per_device_train_batch_size=2, max_steps=3,
                             use_cpu=True, bf16=False, report_to=[], save_strategy="no", learning_rate=5e-3,
                             logging_steps=1, beta=0.1, max_length=64, precompute_ref_log_probs=True, seed=1)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        if graph:
            assert sum(e.calls for e in model._graphed_backbone.entries.values()) == 3
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_lora_dropout_draws_the_forwards_masks_in_the_backward(tmp_path, kernel_device):
    """With LoRA dropout the graphed backbone counts seeds on the device (each replay draws
    anew), and the checkpointed recomputation in its backward must draw the forward's masks
    again: its hidden states and gradients equal those of the same padded batch from the same
    seed without checkpointing (no recomputation), where a different mask would show."""
    from fastqlora.ops import dropout as lora_dropout_state

    model = tiny_lora_model(tmp_path, kernel_device, lora_dropout=0.3)
    FastLanguageModel.for_training(model, cuda_graph=True, bucket=32, capture=False)
    batch = right_padded_batch(kernel_device, seed=4, seq=21)
    with backend("triton"):
        lora_dropout_state.manual_seed(11)
        got, gg = _step(model, batch)
        entry = next(iter(model._graphed_backbone.entries.values()))
        s = entry.static
        model.gradient_checkpointing = "off"
        model.zero_grad(set_to_none=True)
        lora_dropout_state.manual_seed(11)
        with lora_dropout_state.counting():
            h = model.hidden_states(s["input_ids"], None, s["position_ids"], None, s["cu_seq_lens_q"], 32)
        h = h[:, :21]
        _head_loss(h, batch["labels"]).backward()
    valid = batch["labels"] != -100
    tol = 1e-5 if kernel_device == "cpu" else 1e-4
    assert rel_err(got, h.detach()[valid]) < tol
    assert all(rel_err(gg[n], p.grad) < 10 * tol for n, p in model.named_parameters() if p.requires_grad)
    # and the masks were drawn: another seed gives other hidden states
    lora_dropout_state.manual_seed(12)
    with backend("triton"), lora_dropout_state.counting(), torch.no_grad():
        other = model.hidden_states(s["input_ids"], None, s["position_ids"], None, s["cu_seq_lens_q"], 32)
    assert rel_err(other[:, :21][valid], got) > 1e-3


def test_a_failed_capture_is_said_and_the_shape_runs_eagerly(monkeypatch):
    from fastqlora.train.shape_graphs import ShapeEntry, ShapeGraphs

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # no GPU here
    entry = ShapeEntry(slots=8)
    with pytest.warns(RuntimeWarning, match="capturing the backbone's forward and backward as CUDA graphs failed "
                                            r"\(boom\); batches of this shape run eagerly"):
        ShapeGraphs._capture_failed(entry, ValueError("boom"), "the backbone's forward and backward")
    assert entry.failed
