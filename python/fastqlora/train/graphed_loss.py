"""A model's loss forward and its backward replayed together from a CUDA graph, for training
loops that call ``model(**batch).loss.backward()`` and step the optimizer themselves:
transformers' Trainer, a plain loop. (``fastqlora train`` captures its whole step instead:
``step_graph.py``. trl's SFTTrainer computes its loss itself from ``model.base_model``'s hidden
states, not through this forward, so its steps stay eager.)

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

import contextlib
import warnings
from typing import Any

import torch

from ..lora import next_cast_epoch
from ..ops import dropout as lora_dropout_state
from .packing import pad_boundaries, packed_boundaries
from .step_graph import has_dropout, on_side_stream

_KEYS = frozenset({"input_ids", "labels", "attention_mask", "position_ids", "num_items_in_batch"})


class _Entry:
    """One batch shape: its static inputs, graph, loss and gradients."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.calls = 0
        self.replays = 0  # bumped by every call: a backward checks its gradients are still there
        self.static: dict[str, torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
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
        if entry.replays != ctx.token:
            raise RuntimeError("this loss's gradients were overwritten by a later graphed forward of the same batch "
                               "shape: call backward before the next forward, or train without the graph "
                               "(FastLanguageModel.for_training(model, cuda_graph=False))")
        return (None, None, None, *[None if sg is None else sg * g for sg in entry.grads])


class GraphedLoss:
    """``graphed(batch) -> loss`` (or None: run this batch eagerly) for ``model``."""

    def __init__(self, model: torch.nn.Module, *, bucket: int = 128, max_graphs: int = 4, warmup: int = 2,
                 capture: bool | None = None) -> None:
        if bucket < 1 or max_graphs < 1 or warmup < 1:
            raise ValueError(f"bucket, max_graphs and warmup must be positive; got {bucket}, {max_graphs}, {warmup}")
        if getattr(model, "gradient_checkpointing", "off") == "offload":
            raise ValueError("gradient checkpointing with offload allocates pinned host buffers during the step, "
                             "which a CUDA graph cannot hold; use use_gradient_checkpointing=True")
        self.model = model
        self.bucket, self.max_graphs, self.warmup = bucket, max_graphs, warmup
        self.capture = capture
        self.entries: dict[tuple, _Entry] = {}
        self.inside = False  # the model's forward, called from here, runs as usual
        self.dropout: bool | None = None  # whether LoRA dropout counts seeds on the device

    # -- the batch in a fixed shape ------------------------------------------------------
    def _fixed(self, batch: dict[str, Any]) -> tuple[tuple, dict[str, torch.Tensor]] | None:
        """(shape key, CPU tensors of the padded batch) or None when it must run eagerly."""
        if not set(batch) <= _KEYS or batch.get("input_ids") is None or batch.get("labels") is None:
            return None
        ids = batch["input_ids"].detach().cpu()
        labels = batch["labels"].detach().cpu()
        if ids.dim() != 2 or labels.shape != ids.shape:
            return None
        B, S = ids.shape
        mask = batch.get("attention_mask")
        pos = batch.get("position_ids")
        if pos is not None:
            pos = pos.detach().cpu().expand(B, S).to(torch.int64)
        lengths = torch.full((B,), S, dtype=torch.int64)
        if mask is not None:
            m = mask.detach().cpu().to(torch.int64)
            lengths = m.sum(1)
            # right padding only: each row's ones come first; and no label counted on the padding
            # (the eager forward would count it, at positions this path numbers differently)
            if not bool((m == (torch.arange(S) < lengths[:, None]).to(torch.int64)).all()):
                return None
            if bool(((m == 0) & (labels != -100)).any()):
                return None
        W = -(-S // self.bucket) * self.bucket
        out_ids = torch.zeros(B, W, dtype=ids.dtype)
        out_labels = torch.full((B, W), -100, dtype=labels.dtype)
        out_pos = torch.zeros(B, W, dtype=torch.int64)
        for b in range(B):
            n = int(lengths[b])
            out_ids[b, :n] = ids[b, :n]
            out_labels[b, :n] = labels[b, :n]
            out_pos[b, :n] = pos[b, :n] if pos is not None else torch.arange(n)
            out_pos[b, n:] = torch.arange(W - n)  # the padding: a run of its own
        try:
            cu, _ = packed_boundaries(out_pos)
        except ValueError:  # position ids that do not restart at 0 for each sequence
            return None
        num = batch.get("num_items_in_batch")
        if num is None:  # the mean over the counted tokens, as the eager forward takes it
            num = int((out_labels[:, 1:] != -100).sum())
        num = torch.as_tensor(num, dtype=torch.float32).detach().cpu().reshape(())
        count = cu.numel() - 1
        key = (B, W, str(ids.dtype))
        entry = self.entries.get(key)
        slots = entry.slots if entry is not None else max(2 * count, 8)
        if count > slots:
            return None
        return key, {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos,
                     "cu_seq_lens_q": pad_boundaries(cu, slots),
                     "num_items_in_batch": torch.clamp(num, min=1.0)}

    # -- the call ----------------------------------------------------------------------
    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return None
        device = params[0].device
        capture = device.type == "cuda" if self.capture is None else self.capture
        fixed = self._fixed(batch)
        if fixed is None:
            return None
        key, cpu = fixed
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                return None
            entry = self.entries[key] = _Entry(cpu["cu_seq_lens_q"].numel() - 1)
        if entry.static is None:
            entry.static = {k: v.to(device) for k, v in cpu.items()}
        else:
            for k, v in cpu.items():
                entry.static[k].copy_(v, non_blocking=True)
        entry.calls += 1
        entry.replays += 1
        if self.dropout is None:  # the adapters are attached by the first training forward
            self.dropout = has_dropout(self.model)
        with lora_dropout_state.counting() if self.dropout else contextlib.nullcontext():
            if entry.graph is not None:
                entry.graph.replay()
                loss, grads = entry.loss, entry.grads
            elif not capture:
                loss, grads = self._forward_backward(entry, params)
            elif entry.calls <= self.warmup or entry.failed:
                loss, grads = on_side_stream(self._forward_backward, entry, params)
            else:
                loss, grads = self._capture(entry, params)
        entry.grads = grads
        return _HandOver.apply(entry, entry.replays, loss, *params)

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

    def _capture(self, entry: _Entry, params):
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss, grads = self._forward_backward(entry, params)
        except Exception as exc:  # noqa: BLE001  (any capture failure: this shape runs eagerly)
            warnings.warn(f"capturing the loss forward and backward as a CUDA graph failed ({exc}); batches of "
                          "this shape run eagerly", RuntimeWarning, stacklevel=3)
            entry.failed = True
            next_cast_epoch()  # the adapters' casts made during the capture are not valid copies
            torch.cuda.synchronize()
            return on_side_stream(self._forward_backward, entry, params)
        entry.graph, entry.loss = graph, loss
        graph.replay()  # the capture recorded this call's work without running it
        return loss, grads
