"""A small stack that looks like a decoder to the layer loop, for the checkpointing tests.

Each layer has a frozen norm and linear, a trainable LoRA-like adapter behind dropout, and a
causal mean inside packed segments (read from ``ctx``, like attention with
cu_seqlens/position ids), so a wrong ctx, a wrong RNG replay or a wrong checkpoint shows.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastqlora.checkpointing import run_layers


def packed_ctx(lengths: list[list[int]], device="cpu") -> dict:
    """ctx for rows that each pack several sequences: position ids restart at every sequence."""
    pos = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
    return {"position_ids": torch.stack(pos).to(device)}


class ToyDecoderLayer(nn.Module):
    def __init__(self, hidden: int, rank: int = 4, dropout: float = 0.0, index: int = 0):
        super().__init__()
        self.index = index
        self.calls = 0
        self.log: list | None = None  # when set, each call appends ("run", index)
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.base = nn.Linear(hidden, hidden, bias=False)
        self.lora_a = nn.Parameter(torch.randn(rank, hidden) / hidden**0.5)
        self.lora_b = nn.Parameter(torch.randn(hidden, rank) * 0.2)  # nonzero: A gets gradients too
        self.dropout = nn.Dropout(dropout)
        for p in (*self.norm.parameters(), *self.base.parameters()):
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        self.calls += 1
        if self.log is not None:
            self.log.append(("run", self.index))
        pos = ctx["position_ids"]  # (B, T)
        h = self.norm(x)
        # causal mean within each packed sequence, as a (T, T) mixing matrix like attention's
        # (a matmul, not a gather, so its backward is deterministic on the GPU too)
        t = torch.arange(h.shape[1], device=h.device)
        start = t - pos  # (B, T): where each token's sequence starts
        mix = ((t[None, None, :] >= start[..., None]) & (t[None, None, :] <= t[None, :, None])).to(h.dtype)
        h = h + (mix @ h) / (pos + 1)[..., None].to(h.dtype)
        y = self.base(h) + 2.0 * (self.dropout(h) @ self.lora_a.t()) @ self.lora_b.t()
        return x + F.silu(y)


class ToyModel(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 24, layers: int = 5, dropout: float = 0.0,
                 mode="off", train_embedding: bool = False, arena_cache=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.embed.weight.requires_grad_(train_embedding)
        self.layers = nn.ModuleList(ToyDecoderLayer(hidden, dropout=dropout, index=i) for i in range(layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.head = nn.Linear(hidden, vocab, bias=False)
        for p in (*self.norm.parameters(), *self.head.parameters()):
            p.requires_grad_(False)
        self.mode = mode
        self.arena_cache = arena_cache

    def forward(self, ids: torch.Tensor, ctx: dict, labels: torch.Tensor) -> torch.Tensor:
        h = run_layers(self.layers, self.embed(ids), ctx, self.mode, arena_cache=self.arena_cache)
        logits = self.head(self.norm(h)).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def clone_with(model: ToyModel, mode, arena_cache=None) -> ToyModel:
    m = copy.deepcopy(model)
    m.mode, m.arena_cache = mode, arena_cache
    return m


def micro_batch(seed: int, lengths: list[list[int]], vocab: int = 50, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths[0])
    ids = torch.randint(0, vocab, (len(lengths), t), generator=g).to(device)
    labels = torch.randint(0, vocab, (len(lengths), t), generator=g).to(device)
    return ids, packed_ctx(lengths, device), labels


def train_steps(model: ToyModel, steps: list[list[list[list[int]]]], seed: int = 0, lr: float = 0.05):
    """Run steps of gradient accumulation over micro-batches (each a list of packed rows);
    return the losses and the trainable parameters' gradients after each step."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    device = next(model.parameters()).device
    losses, grads = [], []
    for s, micro in enumerate(steps):
        tokens = sum(n for mb in micro for row in mb for n in row)
        opt.zero_grad(set_to_none=True)
        for k, lengths in enumerate(micro):
            ids, ctx, labels = micro_batch(1000 * s + k, lengths, device=device)
            loss = model(ids, ctx, labels) / tokens
            loss.backward()
            losses.append(loss.detach())
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return losses, grads
