"""A whole training step — forward and backward of each micro-batch, gradient clipping,
optimizer step — captured once as a CUDA graph and replayed for each step of the same shape.

Why: at a few thousand tokens a step, a small model's step is bound by the host, not the GPU
(SmolLM3-3B on the H200: ~330 ms of wall for ~180 ms of kernels, ~6,600 launches at tens of
µs of Python and driver work each; benchmarks/NOTES.md). A replay launches the step's
kernels from the driver in one call.

What a capture needs, and how this step provides it:
- no host readback anywhere in the step: the loss's mean scale stays on the device
  (ops.cross_entropy), and the optimizer must be capturable (``torch.optim.AdamW(...,
  capturable=True)``; its learning rate becomes a device tensor that :meth:`set_lr` fills);
- everything that is decided on a first call (Triton's compilation, the NF4 dispatch's timed
  choice, the optimizer's state, the split-K counters) happens before the capture: the first
  ``warmup`` calls run eagerly, on a side stream as torch's capture rules ask;
- random numbers only from counters on the device: the step runs inside
  ``ops.dropout.counting()``, where LoRA dropout's kernel reads its seed from a device counter
  that the step advances, so each replay draws fresh masks and the checkpointed
  recomputation rewinds the counter to draw its forward's again (torch's generator, whose
  state a recomputation restores from the host, is not used);
  no offloaded checkpoints (their pinned host buffers are allocated during the step);
- the batch lives in static tensors: each call copies its batch in, so every batch must
  have the shape, dtype and keys of the first (``input_ids``, ``labels`` with -100 where a
  token does not count, ``num_items_in_batch``, and for packed rows ``position_ids``
  restarting at 0 for each sequence; padding at a row's end as its own run of positions);
- the host never reads the sequences' boundaries during the step: from packed
  ``position_ids`` this step computes them on the CPU (``cu_seq_lens_q``, padded to a fixed
  number of sequences with empty ones, which the attention kernels skip, and
  ``max_length_q`` = the row length) and copies them in with the batch. An ``attention_mask``
  would be read on the host by the model, so it is refused (padding needs none here: as its
  own run of positions it forms a sequence of its own, with labels -100).
The call after the warm-up captures (a capture records the work without running it, so it
replays at once), later calls replay. A capture that fails warns and the steps go on eagerly.
Gradient accumulation (:meth:`GraphedTrainStep.run` over several micro-batches) is unrolled in
the graph: each micro-batch has its own static tensors, the backward passes add into the same
gradients, and the step's loss is the sum of the micro-batches' losses (each already divided by
the whole step's ``num_items_in_batch``).

With several data-parallel processes (``sum_across_processes=True``, torch.distributed
initialized; ``train/distributed.py``) the step sums the gradients and the loss over them
after the last backward, inside the graph: NCCL's all-reduce is captured like any kernel
(every process replays its graph, and the collectives pair up in the same order).

``capture=False`` (what a CPU has) runs every step eagerly; where the ops take the Triton
kernels (a GPU's path; on a CPU under ``TRITON_INTERPRET=1`` with ``ops.backend("triton")``)
it checks, on the step that would be captured, that the forward and backward read nothing
back to the host: the readback a capture would refuse fails there too, by name.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..lora import LoraAdapter, next_cast_epoch
from ..ops import dropout as lora_dropout_state
from ..ops.dispatch import use_triton
from . import distributed
from .packing import pad_boundaries, packed_boundaries

# aten ops that copy a device value to the host (what a CUDA-graph capture refuses)
_READBACK_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
                           "aten::equal", "aten::masked_select", "aten::unique_consecutive", "aten::_unique2"})


class _NoReadback(TorchDispatchMode):
    """Raises on the first op that would read a device value back to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _READBACK_OPS:
            raise RuntimeError(f"the training step reads a value back to the host ({func._schema.name}), "
                               "which a CUDA-graph capture cannot hold; see fastqlora.train.step_graph")
        return func(*args, **(kwargs or {}))


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether any LoRA adapter of ``model`` drops its input (its step then counts dropout
    seeds on the device; without, recomputations need no counter snapshot)."""
    return any(isinstance(m, LoraAdapter) and m.dropout_p > 0 for m in model.modules())


def on_side_stream(fn, *args):
    """``fn(*args)`` on a side stream that waits for, and is waited on by, the current one
    (torch's rule for the eager calls around a CUDA-graph capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return out


class GraphedTrainStep:
    """``step(**batch) -> loss``: one optimizer step of ``model`` on ``batch`` (the model's
    forward arguments: input_ids, labels, ... as tensors of one fixed shape;
    ``num_items_in_batch`` may be a number), replayed from a CUDA graph after ``warmup``
    eager steps; ``step.run([batch, ...])``: one optimizer step over several micro-batches
    (gradient accumulation; their number fixed by the first call). The returned loss is a 0-dim
    device tensor that the next call overwrites: ``float(loss)`` reads it (one sync),
    ``loss.clone()`` keeps it.

    ``max_grad_norm > 0`` clips the trainable parameters' gradients to that total norm before
    the optimizer step, as the Trainer does. ``sum_across_processes``: each process trains
    its slice of a global batch, and the gradients and loss are summed over the processes
    before clipping (every process must call the step, with batches of one shape). ``max_sequences``: the most sequences a packed
    batch may hold (the attention's grid is fixed at the capture); by default twice the first
    batch's count.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
                 warmup: int = 2, capture: bool | None = None, max_sequences: int | None = None,
                 sum_across_processes: bool = False) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (the step runs once before its capture), got {warmup}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: attach adapters (get_peft_model) first")
        device = params[0].device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device; its parameters are on {device}")
        self.dropout = has_dropout(model)
        if self.dropout and self.capture and not use_triton(params[0]):
            raise ValueError("LoRA dropout in a CUDA graph needs the Triton kernels' dropout (its seed counts on the "
                             "device); the reference ops draw from torch's generator, which a capture cannot replay")
        if getattr(model, "gradient_checkpointing", "off") == "offload":
            raise ValueError("gradient checkpointing with offload allocates pinned host buffers during the step, "
                             "which a CUDA graph cannot hold; use use_gradient_checkpointing=True")
        if self.capture:
            for group in optimizer.param_groups:
                if not group.get("capturable", False):
                    raise ValueError(f"{type(optimizer).__name__} must be built with capturable=True for a "
                                     "CUDA graph (its step count stays on the device), e.g. "
                                     "torch.optim.AdamW(params, lr=..., capturable=True)")
        if sum_across_processes and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("sum_across_processes=True needs torch.distributed initialized (e.g. under torchrun)")
        self.sum_across_processes = sum_across_processes
        self.model, self.optimizer, self.params = model, optimizer, params
        self.device_lr()
        self.max_grad_norm = float(max_grad_norm)
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured = False  # the graph is in use (or, without capture, the check has run)
        self.statics: list[dict[str, torch.Tensor]] | None = None  # one a micro-batch
        self.loss: torch.Tensor | None = None
        self.max_sequences = max_sequences
        self.max_length: int | None = None  # max_length_q of packed batches: the row length

    def device_lr(self) -> None:
        """With a capture, every group's learning rate as a one-element tensor on the model's
        device (changeable after the capture by :meth:`set_lr`; called again after an
        optimizer's ``load_state_dict`` put numbers back)."""
        if not self.capture:
            return
        for group in self.optimizer.param_groups:
            if not (isinstance(group["lr"], torch.Tensor) and group["lr"].device == self.params[0].device):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.params[0].device)

    def set_lr(self, lr: float) -> None:
        """The learning rate of every parameter group for the next steps (a captured step
        reads it from the device)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    @property
    def static(self) -> dict[str, torch.Tensor] | None:
        """The first micro-batch's static tensors (the only ones without accumulation)."""
        return self.statics[0] if self.statics else None

    # -- the step ----------------------------------------------------------------------
    def _load(self, batches: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        if not batches:
            raise ValueError("a step needs at least one micro-batch")
        if not all(isinstance(b, dict) for b in batches):
            raise TypeError("run() takes a list of micro-batches, each a dict of the model's forward arguments; got "
                            f"{[type(b).__name__ for b in batches]}")
        if self.statics is not None and len(batches) != len(self.statics):
            raise ValueError(f"this step has {len(batches)} micro-batches; the captured step takes "
                             f"{len(self.statics)} (a graphed step needs one shape)")
        device = self.params[0].device
        loaded = [self._items(batch) for batch in batches]
        if self.statics is None:
            self.statics = [{k: v.to(device, copy=True) for k, v in items.items()} for items in loaded]
            return self.statics
        for items, static in zip(loaded, self.statics):
            if items.keys() != static.keys():
                raise ValueError(f"the batch has keys {sorted(items)}, the captured step {sorted(static)}")
            for key, value in items.items():
                want = static[key]
                if value.shape != want.shape or value.dtype != want.dtype:
                    raise ValueError(f"batch[{key!r}] is {tuple(value.shape)} {value.dtype}; the captured step "
                                     f"takes {tuple(want.shape)} {want.dtype} (a graphed step needs one batch "
                                     "shape: pack to a fixed length)")
                want.copy_(value, non_blocking=True)
        return self.statics

    def _items(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One micro-batch's tensors (numbers made tensors, packed rows' boundaries added)."""
        if "attention_mask" in batch:
            raise ValueError("a graphed step takes no attention_mask (the model would read it on the host): "
                             "give padding its own run of position_ids (0, 1, ...) and labels -100 instead")
        if "cu_seq_lens_q" in batch or "max_length_q" in batch:
            raise ValueError("a graphed step computes cu_seq_lens_q and max_length_q from position_ids itself")
        items = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                if key != "num_items_in_batch" or not isinstance(value, (int, float)):
                    raise TypeError(f"batch[{key!r}] is {type(value).__name__}; a graphed step takes tensors "
                                    "(and a number for num_items_in_batch)")
                value = torch.tensor(value, dtype=torch.float32)
            items[key] = value
        if "position_ids" in items:
            items["cu_seq_lens_q"] = self._boundaries(items["position_ids"])
        return items

    def _boundaries(self, position_ids: torch.Tensor) -> torch.Tensor:
        """cu_seq_lens_q of packed rows, from the ids' CPU copy (:func:`packed_boundaries`),
        then B·S repeated up to ``max_sequences`` + 1 entries: empty sequences, so that every
        batch gives the captured grid one shape."""
        cu, _ = packed_boundaries(position_ids)
        count = cu.numel() - 1
        if self.max_sequences is None:
            self.max_sequences = min(position_ids.numel(), 2 * count)
        if count > self.max_sequences:
            raise ValueError(f"this batch packs {count} sequences; the graphed step holds at most "
                             f"{self.max_sequences} (pass max_sequences=)")
        if self.max_length is None:
            self.max_length = position_ids.shape[-1]
        return pad_boundaries(cu, self.max_sequences)

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        total = None
        for batch in batches:  # the backward passes add into the same gradients
            if "cu_seq_lens_q" in batch:
                batch = {**batch, "max_length_q": self.max_length}
            out = self.model(**batch)
            if out.loss is None:
                raise ValueError("the model returned no loss: pass labels in the batch")
            out.loss.backward()
            loss = out.loss.detach()
            total = loss if total is None else total + loss
        if self.sum_across_processes:  # each loss is already over the global step's label count
            distributed.sum_gradients(self.params)
            torch.distributed.all_reduce(total)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        return total

    def _eager(self, batches: list[dict[str, torch.Tensor]], check: bool = False) -> torch.Tensor:
        """One step launched from Python; ``check``: its forward and backward under the
        readback check (the optimizer's are checked on the GPU: a CPU one is not capturable)."""
        with _NoReadback() if check else contextlib.nullcontext():
            loss = self._forward_backward(batches)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def __call__(self, **batch: Any) -> torch.Tensor:
        return self.run([batch])

    def run(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (each as ``__call__``'s batch, with the whole
        step's ``num_items_in_batch``); returns the sum of their losses."""
        # LoRA dropout's seeds on the device, eager steps too
        with lora_dropout_state.counting() if self.dropout else contextlib.nullcontext():
            return self._run(micro_batches)

    def _run(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        self.model.train()
        statics = self._load(list(micro_batches))
        self.calls += 1
        if not self.capture:
            # where the capture would be nothing may be read back: checked where the ops take
            # the kernels a GPU runs (the CPU's torch paths read masks back and never capture)
            check = self.calls == self.warmup + 1 and use_triton(statics[0].get("input_ids", self.params[0]))
            self.captured = self.calls > self.warmup
            return self._eager(statics, check)
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if self.calls <= self.warmup or self.captured:  # warm-up, or a capture that failed
            return on_side_stream(self._eager, statics)
        return self._capture(statics)

    def _capture(self, statics: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        self.captured = True
        self.optimizer.zero_grad(set_to_none=True)  # the backward allocates the gradients in the graph's pool
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks can serve the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss = self._forward_backward(statics)
                self.optimizer.step()
        except Exception as exc:  # noqa: BLE001  (any capture failure: go on eagerly)
            warnings.warn(f"capturing the training step as a CUDA graph failed ({exc}); the steps run "
                          "eagerly", RuntimeWarning, stacklevel=3)
            self.optimizer.zero_grad(set_to_none=True)
            next_cast_epoch()  # the adapters' casts made during the capture are not valid copies
            torch.cuda.synchronize()
            return on_side_stream(self._eager, statics)
        self.graph, self.loss = graph, loss
        graph.replay()  # the capture recorded this step's work without running it
        return loss
