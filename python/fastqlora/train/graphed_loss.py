"""A model's loss forward and its backward replayed together from a CUDA graph, for training
loops that call ``model(**batch).loss.backward()`` and step the optimizer themselves:
transformers' Trainer, a plain loop. (``fastqlora train`` captures its whole step instead:
``step_graph.py``. trl's SFTTrainer computes its loss itself from ``model.base_model``'s hidden
states, not through this forward: ``graphed_backbone.py`` graphs that.)

Turned on by ``FastLanguageModel.for_training(model, cuda_graph=True)``. Then a training
forward that is given labels and asked for no logits runs through :class:`GraphedLoss`:

* the batch is brought to a fixed shape on the host (one readback of its tensors a step):
  its width padded up to a multiple of ``bucket`` tokens with tokens whose label is -100,
  right padding made a run of positions of its own, the rows' sequence boundaries computed
  from the position ids (``packing.packed_boundaries``), so the model reads nothing back;
* one CUDA graph per shape (at most ``max_graphs``) runs the forward and
  ``torch.autograd.grad`` of the loss for every trainable parameter into static buffers,
  after ``warmup`` eager calls of that shape;
* the loss returned is the output of an autograd Function whose backward hands those
  gradients, times the gradient it receives (a loss divided for accumulation works), to
  autograd, which adds them into ``p.grad`` as it would have (DDP's hooks fire as usual).

The math is the eager forward's and backward's: the padding tokens are labelled -100 and
attend only to themselves. LoRA dropout draws from the device counters (``ops/dropout.py``),
so each replay draws fresh masks.

What it refuses, by name: a backward after another graphed forward of the same shape has
overwritten the gradients it would hand over (two forwards before one backward, as a
preference loss built from two losses would do: turn the graph off for that). What runs
eagerly instead: inputs other than input_ids, labels, attention_mask, position_ids and
num_items_in_batch; an attention mask that is not right padding, or labels counted on the
padding; a shape past
``max_graphs``; evaluation, no_grad, and forwards that ask for logits.
"""
from __future__ import annotations

from typing import Any

import torch

from .shape_graphs import ShapeEntry, ShapeGraphs, check_not_overwritten

_KEYS = frozenset({"input_ids", "labels", "attention_mask", "position_ids", "num_items_in_batch"})


class _Entry(ShapeEntry):
    """One batch shape: its static inputs, graph, loss and gradients."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.grads: tuple[torch.Tensor | None, ...] = ()


class _HandOver(torch.autograd.Function):
    """The graphed forward's loss; its backward returns the gradients the graph computed."""

    @staticmethod
    def forward(ctx, entry: _Entry, token: int, loss: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.entry, ctx.token = entry, token
        return loss.detach().clone()  # the next call of this shape overwrites the static loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        entry = ctx.entry
        check_not_overwritten(entry, ctx.token, "this loss's gradients were")
        return (None, None, None, *[None if sg is None else sg * g for sg in entry.grads])


class GraphedLoss(ShapeGraphs):
    """``graphed(batch) -> loss`` (or None: run this batch eagerly) for ``model``."""

    inside = False  # set while this path calls the model's forward, which then runs as usual

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if not set(batch) <= _KEYS or batch.get("labels") is None:
            return None
        begun = self._begin(batch, _Entry)
        if begun is None:
            return None
        entry, cpu, params, device, capture = begun
        num = batch.get("num_items_in_batch")
        if num is None:  # the mean over the counted tokens, as the eager forward takes it
            num = int((cpu["labels"][:, 1:] != -100).sum())
        num = torch.clamp(torch.as_tensor(num, dtype=torch.float32).detach().cpu().reshape(()), min=1.0)
        if "num_items_in_batch" not in entry.static:
            entry.static["num_items_in_batch"] = num.to(device)
        else:
            entry.static["num_items_in_batch"].copy_(num, non_blocking=True)
        stream = self._side_stream(device) if capture else None
        with self._running(stream):
            if entry.graph is not None:
                entry.graph.replay()
                loss, grads = entry.loss, entry.grads
            elif not capture or entry.calls <= self.warmup or entry.failed:
                loss, grads = self._forward_backward(entry, params)
            else:
                loss, grads = self._capture(entry, params, stream)
            entry.grads = grads
            out = _HandOver.apply(entry, entry.replays, loss, *params)
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        return out

    def _forward_backward(self, entry: _Entry, params: list[torch.nn.Parameter]):
        s = entry.static
        self.inside = True
        try:
            out = self.model(input_ids=s["input_ids"], labels=s["labels"], position_ids=s["position_ids"],
                             cu_seq_lens_q=s["cu_seq_lens_q"], max_length_q=s["input_ids"].shape[1],
                             num_items_in_batch=s["num_items_in_batch"])
        finally:
            self.inside = False
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        return out.loss.detach(), grads

    def _capture(self, entry: _Entry, params, stream: torch.cuda.Stream):
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                loss, grads = self._forward_backward(entry, params)
        except Exception as exc:  # noqa: BLE001  (any capture failure: this shape runs eagerly)
            self._capture_failed(entry, exc, "the loss forward and backward")
            return self._forward_backward(entry, params)
        entry.graph, entry.loss = graph, loss
        graph.replay()  # the capture recorded this call's work without running it
        return loss, grads
