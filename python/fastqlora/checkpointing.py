"""The decoder's layer loop, with gradient checkpointing and activation offload.

Three modes, chosen by ``use_gradient_checkpointing``:

* ``False`` ("off"): plain autograd, every activation kept.
* ``True`` ("checkpoint"): only each layer's input is kept, on the GPU; the layer runs again
  in backward.
* ``"offload"`` (alias ``"unsloth"``): each layer's input goes to a pinned host slab (the
  arena, offload.py) on a side stream while the layer computes; in backward the input of
  layer i-1 comes back while layer i recomputes and backpropagates.

Each layer is one autograd.Function whose inputs are the hidden state and the layer's
trainable parameters, so those get gradients even when the hidden state does not require
grad (frozen embeddings), and gradients reach ``.grad`` through autograd's own accumulation
(gradient accumulation, ``torch.autograd.grad`` and DDP hooks work as without checkpointing).

Backward of one layer, with x its input, y = f(x; θ) its output and g = ∂L/∂y arriving:
    x   <- the saved GPU tensor, or the host slot (already prefetched one layer ahead)
    y'  =  f(x; θ) recomputed with grad on, RNG and autocast replayed from the forward
    (∂L/∂x, ∂L/∂θ) = vjp(y', (x, θ), g)            via torch.autograd.grad
Saved: x (checkpoint mode) or its slot index (offload mode), θ, the RNG/autocast state.
Since the recomputation repeats the forward's operations on the same values, the results
equal plain autograd's bit for bit.
"""
from __future__ import annotations

import collections
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._ext import ptr
from .offload import Arena, OffloadArenaCache, default_cache
from .recompute import ReplayState

_MODES = {"off": "off", "checkpoint": "checkpoint", "offload": "offload", "unsloth": "offload"}


def resolve_mode(value: Any) -> str:
    """Map a ``use_gradient_checkpointing`` value to "off", "checkpoint" or "offload"."""
    if isinstance(value, bool):
        return "checkpoint" if value else "off"
    if isinstance(value, str) and value in _MODES:
        return _MODES[value]
    raise ValueError(
        f"use_gradient_checkpointing={value!r} is not supported; accepted values: False (no "
        "checkpointing), True (checkpoint each layer's input on the GPU), \"offload\" (checkpoints "
        "in pinned host memory), \"unsloth\" (the same as \"offload\"), and the names \"off\" and "
        "\"checkpoint\" for False and True")


def _stream(t: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream) if t.is_cuda else 0


def _end_pass(cache: OffloadArenaCache, arena: Arena, prefetched: dict[int, torch.Tensor]) -> None:
    """Return the arena to its cache. Fetched inputs that no backward used are dropped only
    after the compute stream waits for their copy: the side stream may still be writing them,
    and the allocator would otherwise hand their memory to the next kernel."""
    for slot, buf in prefetched.items():
        arena.native.wait_ready(slot, _stream(buf))
    prefetched.clear()
    cache.release(arena)


class _Pass:
    """One forward through the stack and its backward: the layers, the context, and in offload
    mode the leased arena with the ring of device buffers whose copies may be in flight."""

    def __init__(self, layers: Sequence[nn.Module], ctx: Any, arena: Arena | None,
                 cache: OffloadArenaCache | None, ring: int):
        self.layers = layers
        self.ctx = ctx
        self.arena = arena
        self.ring_size = ring
        self.first: int | None = None  # lowest layer inside the autograd graph
        self.ring: collections.deque[tuple[int, torch.Tensor]] = collections.deque()
        self.meta: dict[int, tuple[torch.Size, torch.dtype, torch.device, int]] = {}
        self.prefetched: dict[int, torch.Tensor] = {}
        self.released = arena is None
        # Give the arena back when backward reaches the lowest layer, or else when the graph
        # dies (no backward, or one that stopped above the lowest layer).
        self._finalizer = (weakref.finalize(self, _end_pass, cache, arena, self.prefetched)
                           if arena is not None else None)
        if self._finalizer is not None:
            self._finalizer.atexit = False  # nothing to give back at interpreter exit

    # forward ---------------------------------------------------------------------------
    def offload(self, i: int, x: torch.Tensor) -> bool:
        """Start copying layer i's input to its host slot; False when it stays on the GPU."""
        arena = self.arena
        if arena is None or i >= arena.plan.host_layers or arena.device != x.device:
            return False
        nbytes = x.numel() * x.element_size()
        if nbytes > arena.plan.slot_bytes or not x.is_contiguous():
            return False
        arena.native.offload(i, ptr(x), nbytes, _stream(x))
        self.meta[i] = (x.shape, x.dtype, x.device, nbytes)
        self.ring.append((i, x))
        return True

    def recycle(self, keep: int) -> None:
        """Let go of ring buffers beyond ``keep``: the compute stream first waits for their
        copy (an event wait on the GPU, not a host block), then the allocator may reuse them."""
        while len(self.ring) > keep:
            slot, x = self.ring.popleft()
            if not self.arena.native.is_done(slot):
                self.arena.native.wait_done(slot, _stream(x))

    # backward --------------------------------------------------------------------------
    def _issue_prefetch(self, i: int) -> torch.Tensor:
        shape, dtype, device, nbytes = self.meta[i]
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.arena.native.prefetch(i, ptr(buf), nbytes, _stream(buf))
        return buf

    def fetch(self, i: int) -> torch.Tensor:
        """Layer i's input back on the device, ready for the compute stream."""
        if self.released:
            raise RuntimeError(
                "the offloaded checkpoints of this forward pass were already consumed by a backward; "
                "backward twice through an offloaded layer stack (retain_graph=True) is not supported: "
                "use use_gradient_checkpointing=True for that")
        buf = self.prefetched.pop(i, None)
        if buf is None:
            buf = self._issue_prefetch(i)
        self.arena.native.wait_ready(i, _stream(buf))
        return buf

    def prefetch_ahead(self, i: int) -> None:
        """Start fetching the inputs of the next ring-1 offloaded layers below layer i."""
        if self.released or self.arena is None:
            return
        issued, j = 0, i - 1
        while j >= (self.first or 0) and issued < self.ring_size - 1:
            if j in self.meta:
                if j not in self.prefetched:
                    self.prefetched[j] = self._issue_prefetch(j)
                issued += 1
            j -= 1

    def finish(self) -> None:
        self.ring.clear()
        self.released = True
        if self._finalizer is not None:
            self._finalizer()  # runs _end_pass once


class _CheckpointedLayer(torch.autograd.Function):
    """y = layers[index](x, ctx), keeping only x (or its host slot) for backward."""

    @staticmethod
    def forward(fctx, run: _Pass, index: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        fctx.run, fctx.index = run, index
        fctx.replay = ReplayState(x)
        fctx.on_host = run.offload(index, x)  # the copy overlaps this layer's compute
        fctx.save_for_backward(*((() if fctx.on_host else (x,)) + params))
        y = run.layers[index](x, run.ctx)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"layer {index} ({type(run.layers[index]).__name__}) returned "
                            f"{type(y).__name__}; run_layers needs layer(hidden, ctx) -> Tensor")
        run.recycle(run.ring_size - 1)
        return y

    @staticmethod
    def backward(fctx, grad_y: torch.Tensor):
        run, i = fctx.run, fctx.index
        saved = fctx.saved_tensors
        if fctx.on_host:
            x, params = run.fetch(i), saved
        else:
            x, params = saved[0], saved[1:]
        run.prefetch_ahead(i)  # the input of layer i-1 travels while layer i recomputes
        need_x = fctx.needs_input_grad[2]
        need_p = fctx.needs_input_grad[3:]
        x = x.detach().requires_grad_(need_x)
        with torch.enable_grad(), fctx.replay.rng(), fctx.replay.autocast():
            y = run.layers[i](x, run.ctx)
        wanted = ([x] if need_x else []) + [p for p, n in zip(params, need_p) if n]
        if y.requires_grad and wanted:
            grads = list(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
        else:
            grads = [None] * len(wanted)
        grad_x = grads.pop(0) if need_x else None
        grad_p = [grads.pop(0) if n else None for n in need_p]
        if i == run.first:
            run.finish()
        return (None, None, grad_x, *grad_p)


def _trainable(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p for p in layer.parameters() if p.requires_grad)


def run_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, ctx: Any, mode: str | bool,
               arena_cache: OffloadArenaCache | None = None) -> torch.Tensor:
    """Run ``hidden = layer(hidden, ctx)`` for each layer, checkpointed as ``mode`` says.

    ``mode`` is a ``use_gradient_checkpointing`` value (see :func:`resolve_mode`).
    ``arena_cache`` holds the offload arenas of this stack; pass one per model (None: one
    kept for ``layers``). ``ctx`` (positions, cu_seqlens, masks...) is reused as-is by the
    recomputation: it must not change before backward, and no gradient flows into it.
    Layers must not modify their input in place.
    """
    mode = resolve_mode(mode)
    if mode == "off" or not torch.is_grad_enabled() or len(layers) == 0:
        for layer in layers:
            hidden = layer(hidden, ctx)
        return hidden
    arena = cache = None
    if mode == "offload":
        cache = arena_cache if arena_cache is not None else default_cache(
            layers if isinstance(layers, nn.Module) else layers[0])
        arena = cache.acquire(len(layers), hidden)
    run = _Pass(layers, ctx, arena, cache, cache.ring if cache is not None else 2)
    try:
        for i, layer in enumerate(layers):
            params = _trainable(layer)
            if not (hidden.requires_grad or params):
                hidden = layer(hidden, ctx)  # nothing to differentiate here: no graph, no checkpoint
                continue
            if run.first is None:
                run.first = i
            hidden = _CheckpointedLayer.apply(run, i, hidden, *params)
    except BaseException:
        run.recycle(0)
        run.finish()
        raise
    run.recycle(0)
    if run.first is None:
        run.finish()  # no layer joined the graph: no backward will come
    return hidden
