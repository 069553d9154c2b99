"""The backbone's training forward and its backward replayed from two CUDA graphs, for
training loops that compute the loss from the final hidden states themselves: trl's
SFTTrainer calls ``model.base_model(...)`` and projects the hidden states through its own
fused LM head (``trl.trainer.utils.add_fused_lm_head``), so the one-graph loss path
(``graphed_loss.py``) never sees its steps.

Turned on by ``FastLanguageModel.for_training(model, cuda_graph=True)``, with the loss path.
Then a training call of ``model.base_model(input_ids, attention_mask | position_ids, ...)``
runs through :class:`GraphedBackbone`:

* the batch is brought to a fixed shape on the host (``shape_graphs.fixed_batch``: width
  padded to a multiple of ``bucket``, boundaries from the position ids);
* per shape (at most ``max_graphs``), after ``warmup`` eager calls, one graph runs the
  forward to the static hidden states ``[B, W, H]`` and records autograd's graph of it; a
  second graph, captured from that autograd graph with ``retain_graph=True``, runs
  ``torch.autograd.grad(hidden, params, grad_outputs=static_grad)`` (torch's
  ``make_graphed_callables`` pattern; both share one memory pool);
* the caller gets a copy of the first S positions of the hidden states, the output of an
  autograd Function; its backward writes the incoming gradient into the static gradient
  (zero on the padding, which no loss reads), replays the backward graph and hands the
  parameters' gradients to autograd, which adds them into ``p.grad`` as it would have.

The math is the eager backbone's: a position's hidden state depends only on its own run of
positions (see ``shape_graphs``), and the backward is the eager one's, with a zero gradient
on the padding. What it refuses: a backward after another forward of the same shape (the
saved activations are overwritten). What runs eagerly: inputs other than input_ids,
attention_mask, position_ids and the flattening collator's boundaries (cu_seq_lens_*,
max_length_*, recomputed from the position ids); left padding; a shape past ``max_graphs``;
evaluation and no_grad.
"""
from __future__ import annotations

from typing import Any

import torch

from .shape_graphs import ShapeEntry, ShapeGraphs, check_not_overwritten

# what trl's forward passes on to the backbone besides the tokens' layout
_IGNORED = frozenset({"use_cache", "return_dict", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


class _Entry(ShapeEntry):
    """One batch shape: static inputs, the two graphs, the hidden states with autograd's
    graph behind them (the static output once captured), their gradient and the parameters'."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.forward: torch.cuda.CUDAGraph | None = None
        self.backward: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None
        self.grad_hidden: torch.Tensor | None = None
        self.grads: tuple[torch.Tensor | None, ...] = ()


class _Hidden(torch.autograd.Function):
    """The first S positions of the backbone's hidden states; its backward runs the
    backbone's backward (a graph replay, or autograd on a warm-up's graph)."""

    @staticmethod
    def forward(ctx, owner: "GraphedBackbone", entry: _Entry, token: int, hidden: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.owner, ctx.entry, ctx.token, ctx.params = owner, entry, token, params
        return hidden.detach().clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (None, None, None, None, *ctx.owner.backward(ctx.entry, ctx.token, g, ctx.params))


class GraphedBackbone(ShapeGraphs):
    """``graphed(batch) -> hidden states [B, S, H]`` (or None: run this batch eagerly)."""

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor | None:
        # options left at None or False ask for nothing (as the loss path reads them)
        extra = {k for k, v in batch.items() if v is not None and v is not False} - {
            "input_ids", "attention_mask", "position_ids"}
        if not extra <= _IGNORED or batch.get("input_ids") is None:
            return None
        if batch.get("cu_seq_lens_q") is not None and batch.get("position_ids") is None:
            return None  # boundaries this path could not recompute
        begun = self._begin(batch, _Entry)
        if begun is None:
            return None
        entry, _, params, device, capture = begun
        S = batch["input_ids"].shape[1]
        stream = self._side_stream(device) if capture else None
        with self._running(stream):
            if entry.forward is not None:
                entry.forward.replay()
            elif capture and entry.calls > self.warmup and not entry.failed:
                self._capture(entry, params, stream)
            else:
                entry.hidden = self._run(entry)
            out = _Hidden.apply(self, entry, entry.replays, entry.hidden[:, :S].detach(), *params)
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        return out

    def backward(self, entry: _Entry, token: int, g: torch.Tensor,
                 params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        """The gradients of ``params`` (the call's trainable parameters) for the gradient ``g``
        of the hidden states handed out by the call numbered ``token`` (runs on the stream the
        call ran on)."""
        check_not_overwritten(entry, token, "these hidden states' activations were")
        if entry.grad_hidden is None:
            entry.grad_hidden = torch.zeros_like(entry.hidden)
        S = g.shape[1]
        entry.grad_hidden[:, :S].copy_(g)
        entry.grad_hidden[:, S:].zero_()  # a wider batch of this bucket may have written there
        if entry.backward is not None:
            entry.backward.replay()
            return entry.grads
        if entry.hidden.grad_fn is None:
            raise RuntimeError("the backbone's hidden states of this call were already used by a backward")
        hidden, entry.hidden = entry.hidden, entry.hidden.detach()  # the warm-up's autograd graph, used once
        with self._running(None):  # the recomputation rewinds dropout's counters as in the forward
            return torch.autograd.grad(hidden, params, grad_outputs=entry.grad_hidden, allow_unused=True)

    def _run(self, entry: _Entry) -> torch.Tensor:
        s = entry.static
        return self.model.hidden_states(s["input_ids"], None, s["position_ids"], None, s["cu_seq_lens_q"],
                                        s["input_ids"].shape[1])

    def _capture(self, entry: _Entry, params: list[torch.nn.Parameter], stream: torch.cuda.Stream) -> None:
        torch.cuda.synchronize()
        if entry.grad_hidden is None:  # allocated outside the graphs' pool
            entry.grad_hidden = torch.zeros_like(entry.hidden)
        entry.hidden = None  # the last warm-up's activations, if its backward never ran
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(forward, stream=stream):
                hidden = self._run(entry)
            with torch.cuda.graph(backward, pool=forward.pool(), stream=stream):
                grads = torch.autograd.grad(hidden, params, grad_outputs=entry.grad_hidden, retain_graph=True,
                                            allow_unused=True)
        except Exception as exc:  # noqa: BLE001  (any capture failure: this shape runs eagerly)
            self._capture_failed(entry, exc, "the backbone's forward and backward")
            entry.hidden = self._run(entry)
            return
        entry.forward, entry.backward, entry.hidden, entry.grads = forward, backward, hidden, grads
        forward.replay()  # the capture recorded this call's work without running it
