"""Generation's decode step captured once as a CUDA graph and replayed for every token.

A 4-bit Llama-3-8B decode step is ~2,100 kernel launches for ~14 ms of kernels; launched
from Python one at a time they took 66-72 ms a token on the H200 (benchmarks/NOTES.md): the
host, not the GPU, set the pace. Replayed from a graph, the host issues one launch a token.

A captured step may read no host value that changes between steps. So, in this mode:
- the KV cache is written at a device index (``KVCache.index``, moved in place by the step)
  and attention reads the whole capacity, the unwritten positions masked;
- the position ids live in one device tensor that the step advances in place;
- the RoPE tables cover the whole capacity (computed before the capture and held here,
  since the graph reads their memory);
- the step's token ids are copied into a static input before each replay, and the logits
  come back in a static output that the next replay overwrites.
Everything the graph reads (the model's weights, the adapters' 16-bit copies, the cache,
the tables) stays alive and in place for the graph's life: one generate() call, in which
no weight changes.

The eager step before the capture (generation's first decode step) is the warm-up: Triton
kernels compiled, the NF4 dispatch's choice for the shape timed and checked.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generation import KVCache


class DecodeGraph:
    """One token a row per call: ``logits = graph(tokens [B, 1])``, the cache advanced.

    ``capture=False`` runs the same device-indexed step eagerly (no graph), with the host's
    ``cache.length`` held at its value when the graph would have been captured, as a replay
    sees it: what the CPU tests use to check the step against the eager decode, including
    that it reads no host value that moves."""

    def __init__(self, model, cache: KVCache, *, capture: bool = True) -> None:
        self.model, self.cache = model, cache
        device = cache.valid.device
        self.tables = model._rope_tables(cache.capacity, device)
        cache.index = torch.tensor([cache.length], dtype=torch.long, device=device)
        cache.positions = cache.positions.clone()  # one tensor, advanced in place from here on
        self.tokens = torch.zeros(cache.valid.shape[0], 1, dtype=torch.long, device=device)
        self.graph = None
        self._captured_length = cache.length
        self.device = device
        if capture:
            try:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.device(device), torch.cuda.graph(self.graph):
                    self.logits = model.static_decode(self.tokens, cache, self.tables)
            except BaseException:
                cache.index = None  # the cache goes on with eager steps (a capture runs nothing)
                raise

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"this decode graph takes tokens of shape {tuple(self.tokens.shape)}, "
                             f"got {tuple(tokens.shape)}")
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"KV cache holds {self.cache.capacity} positions; {self.cache.length + 1} "
                             "were asked for")
        if self.graph is None:
            length, self.cache.length = self.cache.length, self._captured_length
            try:
                logits = self.model.static_decode(tokens, self.cache, self.tables)
            finally:
                self.cache.length = length
        else:
            self.tokens.copy_(tokens)
            with torch.cuda.device(self.device):
                self.graph.replay()
            logits = self.logits
        self.cache.length += 1
        return logits


def capture_or_none(model, cache: KVCache) -> DecodeGraph | None:
    """The captured decode step, or None after a warning when the capture fails (an op that
    cannot be captured): generation then goes on with eager steps, which compute the same."""
    try:
        return DecodeGraph(model, cache)
    except RuntimeError as e:
        warnings.warn(f"capturing the decode step as a CUDA graph failed ({e}); decoding eagerly. "
                      "FASTQLORA_DECODE_GRAPH=0 skips the attempt.", RuntimeWarning, stacklevel=2)
        return None
