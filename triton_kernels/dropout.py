"""Dropout whose mask is drawn from a counter-based generator instead of being stored.

Element e of a call keeps its value, scaled by 1/(1 − p), when its 16-bit draw ``r_e`` is at
least ``t = round(p · 2^16)``: it is dropped with probability t/2^16, p to within 2^-17
(torch's dropout compares a 24-bit float draw). The draws come from Philox-4x32-10 keyed by
a 64-bit seed read from a device tensor. The same seed always gives the same draws, so:
  * the backward draws the mask again: ``dx = dy · mask / (1 − p)`` (dropout is linear in
    x with the mask fixed), and nothing mask-sized is saved;
  * a checkpointed recomputation that reads the same seed drops the same elements;
  * the seed lives on the device, so a CUDA graph that advances it replays fresh masks.
One Philox call gives four 32-bit words, eight 16-bit draws: a program of BLOCK elements
makes BLOCK/8 calls (counters c = start/8 + q) and gives half-word h of word j of call q to
element start + (2j + h)·BLOCK/8 + q, so each of its eight loads and stores is contiguous.
With one draw a call the kernel was bound by Philox's integer work (bf16 4096 x 14336:
0.254 ms forward + backward, ~2x the bytes' floor; benchmarks/NOTES.md). Philox's counter
word is 32 bits; the part of start/8 past 2^31 goes into the key (a program's counters share
it, as BLOCK/8 divides 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _keep_scale(X, Y, offs, n, r, thresh, scale):
    inb = offs < n
    x = tl.load(X + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.where(r >= thresh, x * scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _halves(X, Y, start, Q: tl.constexpr, j: tl.constexpr, q, n, word, thresh, scale):
    _keep_scale(X, Y, start + (2 * j) * Q + q, n, (word & 0xFFFF).to(tl.int32), thresh, scale)
    _keep_scale(X, Y, start + (2 * j + 1) * Q + q, n, (word >> 16).to(tl.int32), thresh, scale)


@triton.jit
def _dropout_kernel(X, Y, n, thresh, scale, SEED, BLOCK: tl.constexpr):
    Q: tl.constexpr = BLOCK // 8
    start = tl.program_id(0).to(tl.int64) * BLOCK
    c0 = start // 8
    key = tl.load(SEED) + (c0 >> 31) * 0x9E3779B1  # the counter's high part, spread over the key
    q = tl.arange(0, Q)
    w0, w1, w2, w3 = tl.randint4x(key, ((c0 & 0x7FFFFFFF) + q).to(tl.int32))
    _halves(X, Y, start, Q, 0, q, n, w0, thresh, scale)
    _halves(X, Y, start, Q, 1, q, n, w1, thresh, scale)
    _halves(X, Y, start, Q, 2, q, n, w2, thresh, scale)
    _halves(X, Y, start, Q, 3, q, n, w3, thresh, scale)


def dropout_apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``x · mask / (1 − p)`` for the mask of ``seed`` (a one-element int64 tensor on x's
    device); x contiguous. Used for the forward (x) and the backward (dy) alike."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        thresh = min(round(p * 65536), 65535)
        _dropout_kernel[(triton.cdiv(n, _BLOCK),)](x, y, n, thresh, 1.0 / (1.0 - p), seed, BLOCK=_BLOCK)
    return y
