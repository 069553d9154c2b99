"""What the two per-shape CUDA-graph paths for other people's training loops share
(``graphed_loss.py``: the loss forward and backward in one graph, for transformers' Trainer
and plain loops; ``graphed_backbone.py``: the backbone's forward and backward as two graphs,
for trl's SFTTrainer, which computes its loss from the hidden states itself).

* :func:`fixed_batch` brings a batch to a fixed shape on the host: its width padded up to a
  multiple of ``bucket`` tokens (label -100), each row's right padding made a run of
  positions of its own that attends only to itself, the sequence boundaries computed from
  the position ids, so the model reads nothing back. The real tokens' hidden states are the
  unpadded batch's: causal attention within a run never sees a later token, and RoPE scores
  depend on relative positions only (the padding restarts at 0 where the eager forward
  continues its numbering; only rounding can tell them apart, and nothing is counted there).
* :class:`ShapeGraphs` keeps one entry a shape (at most ``max_graphs``; once they are all
  taken, a batch whose padded width is at most a third narrower than a graph's is padded up to
  it and replays that graph instead of running eagerly), one side stream a GPU, and the
  warm-up count.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from ..lora import next_cast_epoch
from ..ops import dropout as lora_dropout_state
from .packing import packed_boundaries, pad_boundaries
from .step_graph import has_dropout


def fixed_batch(batch: dict[str, Any], bucket: int,
                width: int | None = None) -> tuple[tuple, int, dict[str, torch.Tensor]] | None:
    """(shape key, sequence count, CPU tensors) for ``batch`` (input_ids ``[B, S]``, and
    optionally labels, attention_mask, position_ids) padded to a multiple of ``bucket``
    tokens (or to ``width`` ≥ S): input_ids, position_ids, cu_seq_lens_q (unpadded
    boundaries) and labels when given; or None when the batch must run eagerly (left padding,
    labels counted on the padding, position ids that do not restart at 0 for each sequence)."""
    if batch.get("input_ids") is None:
        return None
    ids = batch["input_ids"].detach().cpu()
    if ids.dim() != 2:
        return None
    B, S = ids.shape
    labels = batch.get("labels")
    if labels is not None:
        labels = labels.detach().cpu()
        if labels.shape != ids.shape:
            return None
    mask = batch.get("attention_mask")
    pos = batch.get("position_ids")
    if pos is not None:
        pos = pos.detach().cpu()
        if pos.dim() != 2 or pos.shape[1] != S or pos.shape[0] not in (1, B):
            return None
        pos = pos.expand(B, S).to(torch.int64)
    lengths = torch.full((B,), S, dtype=torch.int64)
    if mask is not None:
        m = mask.detach().cpu().to(torch.int64)
        if m.shape != (B, S):
            return None
        lengths = m.sum(1)
        # right padding only: each row's ones come first; and no label counted on the padding
        # (the eager forward would count it, at positions this path numbers differently)
        if not bool((m == (torch.arange(S) < lengths[:, None]).to(torch.int64)).all()):
            return None
        if labels is not None and bool(((m == 0) & (labels != -100)).any()):
            return None
    W = -(-S // bucket) * bucket if width is None else width
    if W < S:
        raise ValueError(f"fixed_batch: width {W} is narrower than the batch ({S} tokens)")
    out_ids = torch.zeros(B, W, dtype=ids.dtype)
    out_pos = torch.zeros(B, W, dtype=torch.int64)
    out_labels = torch.full((B, W), -100, dtype=labels.dtype) if labels is not None else None
    for b in range(B):
        n = int(lengths[b])
        out_ids[b, :n] = ids[b, :n]
        if out_labels is not None:
            out_labels[b, :n] = labels[b, :n]
        out_pos[b, :n] = pos[b, :n] if pos is not None else torch.arange(n)
        out_pos[b, n:] = torch.arange(W - n)  # the padding: a run of its own
    try:
        cu, _ = packed_boundaries(out_pos)
    except ValueError:  # position ids that do not restart at 0 for each sequence
        return None
    out = {"input_ids": out_ids, "position_ids": out_pos, "cu_seq_lens_q": cu}
    if out_labels is not None:
        out["labels"] = out_labels
    return (B, W, str(ids.dtype)), cu.numel() - 1, out


def check_not_overwritten(entry: "ShapeEntry", token: int, what: str) -> None:
    """Raise unless ``entry`` is still at the call numbered ``token`` (``what``: what a later
    forward of the same shape overwrote)."""
    if entry.replays != token:
        raise RuntimeError(f"{what} overwritten by a later graphed forward of the same batch shape: call "
                           "backward before the next forward, or train without the graph "
                           "(FastLanguageModel.for_training(model, cuda_graph=False))")


class ShapeEntry:
    """One batch shape: its static inputs on the device, its graphs, and its call counts."""

    def __init__(self, slots: int) -> None:
        self.slots = slots  # sequences the static boundaries hold (the attention's grid)
        self.calls = 0
        self.replays = 0  # bumped by every call: a backward checks its gradients are still there
        self.static: dict[str, torch.Tensor] | None = None
        self.failed = False


class ShapeGraphs:
    """Entries by batch shape, a side stream, and the options of a per-shape graph path."""

    def __init__(self, model: torch.nn.Module, *, bucket: int = 128, max_graphs: int = 4, warmup: int = 2,
                 capture: bool | None = None) -> None:
        for name, value in (("bucket", bucket), ("max_graphs", max_graphs), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if bucket < 1 or max_graphs < 1 or warmup < 1:
            raise ValueError(f"bucket, max_graphs and warmup must be positive; got {bucket}, {max_graphs}, {warmup}")
        if getattr(model, "gradient_checkpointing", "off") == "offload":
            raise ValueError("gradient checkpointing with offload allocates pinned host buffers during the step, "
                             "which a CUDA graph cannot hold; use use_gradient_checkpointing=True")
        self.model = model
        self.bucket, self.max_graphs, self.warmup = bucket, max_graphs, warmup
        self.capture = capture
        self.entries: dict[tuple, Any] = {}
        self.dropout: bool | None = None  # whether LoRA dropout counts seeds on the device
        self.stream: torch.cuda.Stream | None = None  # made at the first call on a GPU

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _capturing(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.capture is None else self.capture

    def _begin(self, batch: dict[str, Any], make) -> tuple[Any, dict, list, torch.device, bool] | None:
        """(entry, CPU tensors, trainable parameters, device, whether to capture) for a call,
        or None when it runs eagerly; see :meth:`_entry`."""
        params = self._params()
        if not params:
            return None
        device = params[0].device
        found = self._entry(batch, device, make)
        if found is None:
            return None
        return (*found, params, device, self._capturing(device))

    def _entry(self, batch: dict[str, Any], device: torch.device, make) -> tuple[Any, dict] | None:
        """(the entry of this batch's shape with its static inputs filled, the CPU tensors),
        or None when it runs eagerly. ``make(slots)`` makes a new entry."""
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        B, S = ids.shape
        key = (B, -(-S // self.bucket) * self.bucket, str(ids.dtype))  # fixed_batch's key
        if key not in self.entries and len(self.entries) >= self.max_graphs:
            # every graph taken: one at most a third wider serves this batch, padded up to it
            key = min((k for k in self.entries if k[0] == B and k[2] == key[2] and key[1] < k[1]
                       and 3 * k[1] <= 4 * key[1]), key=lambda k: k[1], default=None)
            if key is None:
                return None
        fixed = fixed_batch(batch, self.bucket, width=key[1])
        if fixed is None:
            return None
        key, count, cpu = fixed
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = make(max(2 * count, 8))
        if count > entry.slots:
            return None
        cpu["cu_seq_lens_q"] = pad_boundaries(cpu["cu_seq_lens_q"], entry.slots)
        if entry.static is None:
            entry.static = {k: v.to(device) for k, v in cpu.items()}
        else:
            for k, v in cpu.items():
                entry.static[k].copy_(v, non_blocking=True)
        entry.calls += 1
        entry.replays += 1
        if self.dropout is None:  # the adapters are attached by the first training forward
            self.dropout = has_dropout(self.model)
        return entry, cpu

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """This object's side stream, made to wait for the caller's work so far. Everything of
        a call runs on it, the autograd Function that hands the gradients over included:
        autograd's AccumulateGrad node of a parameter remembers the stream it was made on, and
        a caller's previous loss (still referenced while the next forward runs) keeps those
        nodes alive; made on the caller's stream, they would make a capture's autograd.grad
        wait on that stream, which ends the capture."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        return self.stream

    def _running(self, stream: torch.cuda.Stream | None) -> contextlib.ExitStack:
        """Where a call's work runs: on ``stream`` (None: the current one), and inside LoRA
        dropout's device counting when the model has dropout (each replay draws anew)."""
        stack = contextlib.ExitStack()
        if stream is not None:
            stack.enter_context(torch.cuda.stream(stream))
        if self.dropout:
            stack.enter_context(lora_dropout_state.counting())
        return stack

    @staticmethod
    def _capture_failed(entry: ShapeEntry, exc: Exception, what: str) -> None:
        """After any capture failure: say so once; this shape runs eagerly from now on."""
        warnings.warn(f"capturing {what} as CUDA graphs failed ({exc}); batches of this shape run eagerly",
                      RuntimeWarning, stacklevel=4)
        entry.failed = True
        next_cast_epoch()  # the adapters' casts made during the capture are not valid copies
        torch.cuda.synchronize()
