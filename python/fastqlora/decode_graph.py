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

The first call runs the same step eagerly: the warm-up, in which Triton compiles and the NF4
dispatch times and checks its kernels for the shape (a dispatch inside a capture cannot time
anything, so it would take its untimed default). The second call captures the step, then
every call replays it. A capture that fails warns once, and the steps go on eagerly.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generation import KVCache


class DecodeGraph:
    """One token a row per call: ``logits = graph(tokens [B, 1])``, the cache advanced.

    ``capture=False`` runs the same device-indexed steps eagerly, and from the second call
    on with the host's ``cache.length`` held where a capture would have seen it, as a replay
    does: what the CPU tests use to check the steps against the eager decode, including that
    they read no host value that moves."""

    def __init__(self, model, cache: KVCache, *, capture: bool = True) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        self.device = cache.valid.device
        self.tables = model.rope_tables(cache.capacity, self.device)
        cache.index = torch.tensor([cache.length], dtype=torch.long, device=self.device)
        cache.positions = cache.positions.clone()  # one tensor, advanced in place from here on
        self.tokens = torch.zeros(cache.valid.shape[0], 1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self._seen_length: int | None = None  # cache.length when the step was (or would be) captured

    def _capture(self) -> None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(self.device), torch.cuda.graph(graph):
                self.logits = self.model.static_decode(self.tokens, self.cache, self.tables)
        except RuntimeError as e:  # an op that cannot be captured: a capture runs nothing, so go on eagerly
            warnings.warn(f"capturing the decode step as a CUDA graph failed ({e}); decoding eagerly. "
                          "FASTQLORA_DECODE_GRAPH=0 skips the attempt.", RuntimeWarning, stacklevel=3)
            return
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"this decode graph takes tokens of shape {tuple(self.tokens.shape)}, "
                             f"got {tuple(tokens.shape)}")
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"KV cache holds {self.cache.capacity} positions; {self.cache.length + 1} "
                             "were asked for")
        if self.calls == 1:  # after the warm-up
            self._seen_length = self.cache.length
            if self.capture:
                self._capture()
        if self.graph is not None:
            self.tokens.copy_(tokens)
            with torch.cuda.device(self.device):
                self.graph.replay()
            logits = self.logits
        else:
            length = self.cache.length
            if self._seen_length is not None:
                self.cache.length = self._seen_length
            try:
                logits = self.model.static_decode(tokens, self.cache, self.tables)
            finally:
                self.cache.length = length
        self.calls += 1
        self.cache.length += 1
        return logits
