"""Token generation with a KV cache: greedy or sampled, stopping at EOS.

The model supplies two calls — ``prefill(input_ids, attention_mask, cache)`` returning
the last position's logits, and ``decode(tokens, cache)`` returning the next
logits — and this module owns the loop, the cache and the sampling rules
(temperature, top-k, nucleus top-p, as transformers applies them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ops.dispatch import decode_attention_enabled, use_triton


@dataclass
class KVCache:
    """Keys and values of every layer, ``[B, capacity, Hk, D]`` each, plus which cached
    positions are real (left padding leaves holes at the start of short rows).

    Two ways to write it: the host's ``length`` (eager steps: the new keys go at ``length``,
    attention reads the filled prefix), or, once ``index`` is set (a ``[1]`` long tensor on
    the device), at ``index`` with attention over the whole capacity, masked: no host value
    changes from step to step, so a step can be captured as a CUDA graph and replayed
    (fastqlora.decode_graph)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor  # bool [B, capacity]
    length: int = 0
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [B] next position id
    index: torch.Tensor | None = None  # the device's copy of length, when steps read it there
    dense_prompt: bool = False  # set by the prefill: the prompt has no padding holes

    @classmethod
    def allocate(cls, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> KVCache:
        def buf():
            return torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)

        return cls([buf() for _ in range(num_layers)], [buf() for _ in range(num_layers)],
                   torch.zeros(batch, capacity, dtype=torch.bool, device=device), 0,
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def start(self) -> int | torch.Tensor:
        """Where this step's keys go: the device index when set, else the host length."""
        return self.index if self.index is not None else self.length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, n, Hk, D]`` at the current position; returns what attention
        reads: the filled prefix, or with a device index the whole buffer.
        The caller advances ``length`` (and ``index``) once per step, after the last layer."""
        n = k.shape[1]
        if self.index is not None:
            rows = self.index if n == 1 else self.index + torch.arange(n, device=k.device)
            self.keys[layer].index_copy_(1, rows, k)
            self.values[layer].index_copy_(1, rows, v)
            return self.keys[layer], self.values[layer]
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} were asked for")
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, *,
                     start: int | torch.Tensor, scale: float, sliding_window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Attention of new queries ``q [B, n, Hq, D]`` (cache positions ``start..start+n-1``;
    ``start`` an int or a ``[1]`` device tensor) over ``k, v [B, T, Hk, D]`` (the cache's
    prefix or all of it): causal, padding holes and unwritten positions masked, optional
    window and soft-cap. fp32 math; output in q's dtype.

    The query heads sharing a key head are one matmul's rows (``[B, Hk, rep·n, D]``), so the
    keys and values are never repeated per query head."""
    B, n, Hq, D = q.shape
    if n == 1 and decode_attention_enabled() and use_triton(q) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        from .triton_kernels.decode_attention import decode_attention_fwd  # two launches a layer

        pos = start if isinstance(start, torch.Tensor) else _position_tensor(start, q.device)
        return decode_attention_fwd(q, k, v, valid, pos, scale, sliding_window, softcap)
    kf = k.float().transpose(1, 2)  # [B, Hk, T, D]
    vf = v.float().transpose(1, 2)
    rows = max(1, SCORES_BYTES // (4 * B * Hq * k.shape[1]))
    if n <= rows or isinstance(start, torch.Tensor):
        return _attend(q, kf, vf, valid, start, scale, sliding_window, softcap).to(q.dtype)
    # a long prompt: queries a chunk at a time, so that the fp32 scores stay within
    # SCORES_BYTES (at 16k tokens the whole [Hq, S, S] would be 32 GiB); each chunk reads only
    # the keys at or before its last position
    out = []
    for i in range(0, n, rows):
        end = min(start + min(i + rows, n), k.shape[1])  # one past the chunk's last position
        out.append(_attend(q[:, i:i + rows], kf[:, :, :end], vf[:, :, :end], valid, start + i, scale,
                           sliding_window, softcap).to(q.dtype))
    return torch.cat(out, dim=1)


_last_position: tuple[int, torch.device, torch.Tensor] | None = None


def _position_tensor(start: int, device: torch.device) -> torch.Tensor:
    """An eager step's cache position as the one-element device tensor the decode-attention
    kernels read: made once a step and shared by its layers (each copy from the host is a
    transfer the host waits for)."""
    global _last_position
    if _last_position is None or _last_position[0] != start or _last_position[1] != device:
        _last_position = (start, device, torch.tensor([start], device=device))
    return _last_position[2]


# the most bytes of fp32 scores one piece of a prefill's cached attention holds at once
SCORES_BYTES = 1 << 28


def _attend(q, kf, vf, valid, start, scale, sliding_window, softcap) -> torch.Tensor:
    """cached_attention's math for queries ``q [B, n, Hq, D]`` over fp32 ``kf, vf
    [B, Hk, T, D]``; fp32 out."""
    B, n, Hq, D = q.shape
    Hk, T = kf.shape[1], kf.shape[2]
    rep = Hq // Hk
    # head h = j·rep + r reads key head j (repeat_interleave's order); rows ordered (r, t)
    qf = q.float().view(B, n, Hk, rep, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, rep * n, D)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, Hk, rep·n, T]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    qpos = (torch.arange(n, device=q.device) + start)[:, None]
    kpos = torch.arange(T, device=q.device)[None, :]
    allowed = kpos <= qpos  # [n, T]
    if sliding_window is not None:
        allowed = allowed & ((qpos - kpos) < sliding_window)
    allowed = allowed.repeat(rep, 1)[None, None] & valid[:, None, None, :T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vf).view(B, Hk, rep, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, Hq, D)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus top-p (keeping at least one token)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# the fewest new tokens for which generate() captures its decode step as a CUDA graph
GRAPH_MIN_TOKENS = 8


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, streamer=None, repetition_penalty: float = 1.0,
             min_new_tokens: int = 0) -> torch.Tensor:
    """Prompt ids ``[B, S]`` (left-padded when rows differ) followed by up to
    ``max_new_tokens`` generated ids; finished rows are filled with ``pad_token_id``.
    ``streamer``: transformers' streamer protocol (``put(ids)``, then ``end()``), as
    ``TextStreamer`` implements: it gets the prompt, then each new token as it is chosen.
    ``repetition_penalty`` and ``min_new_tokens`` as transformers applies them: every token
    already in the row (prompt included) has its logit divided by the penalty when positive and
    multiplied when negative; the stop ids are barred until ``min_new_tokens`` are generated."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must not be negative, got {min_new_tokens}")
    B, S = input_ids.shape
    if streamer is not None:
        streamer.put(input_ids.cpu())
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    cache = model.allocate_cache(B, S + max_new_tokens)
    logits = model.prefill(input_ids, attention_mask, cache)
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    switch = getattr(model, "rope_switch_length", None)
    # the model may run its decode steps as a CUDA graph (fastqlora.decode_graph), worth its
    # capture only for more than a few tokens
    graph = None
    if max_new_tokens >= GRAPH_MIN_TOKENS and hasattr(model, "decode_graph"):
        graph = model.decode_graph(cache)
    history = None
    if repetition_penalty != 1.0:  # the rows so far, for the penalty's gather
        history = torch.empty(B, S + max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
        history[:, :S] = input_ids
    for step in range(max_new_tokens):
        logits = logits.float()
        if history is not None:
            seen = history[:, :S + step]
            score = logits.gather(1, seen)
            logits = logits.scatter(1, seen, torch.where(score < 0, score * repetition_penalty,
                                                         score / repetition_penalty))
        if step < min_new_tokens and eos.numel():
            logits = logits.index_fill(1, eos, float("-inf"))
        if do_sample:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt[:, None])
        if history is not None:
            history[:, S + step] = nxt
        if streamer is not None:
            streamer.put(nxt.cpu())
        if eos.numel():  # the one host read a step, and only when something can stop
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break  # the last token's logits are not needed
        if switch is not None and S + step + 1 == switch + 1 and cache.length <= switch:
            # the sequence now reaches past the original context, where longrope rotates with its
            # long factors: recompute every key with them, as transformers' generate does
            seq = torch.cat(out, dim=1)
            prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            mask = torch.cat([prompt_mask.to(seq.device), torch.ones_like(seq[:, S:])], dim=1)
            cache = model.allocate_cache(B, S + max_new_tokens)
            logits = model.prefill(seq, mask, cache)
            graph = None
        elif graph is not None:
            logits = graph(nxt[:, None])
        else:
            logits = model.decode(nxt[:, None], cache)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
