"""The decoder every supported family shares, read top to bottom: RMSNorm, attention,
the gated MLP, the layer, the stack, and the causal-LM head with its loss.

Parameter names follow transformers (``model.layers.{i}.self_attn.q_proj`` ...), so
PEFT adapter keys and merged checkpoints map one to one. Activations are
``[batch, seq, ...]``; attention runs on ``[batch, seq, heads, head_dim]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.dispatch import fused_nf4_enabled
from ..generation import KVCache, cached_attention
from ..tiling import tiled_apply
from .config import ModelConfig
from .linear import FrozenLinear, grouped_forward


MLP_TILE_ABOVE = 16384  # tokens in a batch past which the MLP runs in tiles
MLP_TILE_BYTES = 1 << 30  # intermediates one MLP tile may hold


@dataclass
class Context:
    """What every layer of one forward pass shares."""

    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor  # [B, S]
    cu_seqlens: torch.Tensor | None  # over the flattened B·S tokens; None: each row one sequence
    max_seqlen: int | None = None  # longest sequence in cu_seqlens (spares the kernels a sync)
    local: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) of cfg.rope_local (Gemma 3)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float, dtype=None, device=None) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, dtype=None, device=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = cfg.window(layer)
        self.local_rope = cfg.local_rope(layer)  # Gemma 3's sliding layers rotate with their own tables
        self.rope = cfg.uses_rope(layer)  # SmolLM3 leaves every fourth layer without RoPE
        h, d, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        if cfg.fused_projections:  # Phi-3: q, k and v as one projection (and one adapter)
            self.qkv_proj = FrozenLinear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias, dtype, device)
        else:
            self.q_proj = FrozenLinear(h, cfg.num_heads * d, bias, dtype, device)
            self.k_proj = FrozenLinear(h, cfg.num_kv_heads * d, bias, dtype, device)
            self.v_proj = FrozenLinear(h, cfg.num_kv_heads * d, bias, dtype, device)
        self.o_proj = FrozenLinear(cfg.num_heads * d, h, cfg.o_bias, dtype, device)
        if cfg.qk_norm:  # Qwen 3: each head of q and k RMS-normalized over head_dim before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset, dtype, device)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset, dtype, device)
        elif cfg.qk_norm_full:  # OLMo 2: over all heads of the projection at once
            self.q_norm = RMSNorm(cfg.num_heads * d, cfg.rms_norm_eps, cfg.norm_offset, dtype, device)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d, cfg.rms_norm_eps, cfg.norm_offset, dtype, device)

    def _qkv(self, x: torch.Tensor, cos, sin, position_ids, rotate: bool = True):
        """q, k, v as [B, S, H, D], q and k rotated; with ``rotate=False`` (a RoPE layer of
        separate projections only) q and k unrotated as [B, S, H·D] for the caller to rotate."""
        B, S, _ = x.shape
        c = self.cfg
        if c.fused_projections:  # one launch rotates q and k inside the fused output; no copies
            qkv = ops.apply_rope_qkv(self.qkv_proj(x), c.num_heads, c.num_kv_heads, c.head_dim, cos, sin,
                                     position_ids)
            nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return (qkv[..., :nq].unflatten(-1, (c.num_heads, c.head_dim)),
                    qkv[..., nq:nq + nk].unflatten(-1, (c.num_kv_heads, c.head_dim)),
                    qkv[..., nq + nk:].unflatten(-1, (c.num_kv_heads, c.head_dim)))
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if fused_nf4_enabled(x) and all(p.adapter is None or hasattr(p.adapter, "lora_A") for p in projs):
            from ..ops.lora_fused import lora_projections  # one read of x, one thin LoRA product

            q, k, v = lora_projections(x, [p.proj() for p in projs])
            # views of one output: RoPE rotates in place, which autograd forbids on such views
            q, k = q.clone(), k.clone()
        else:
            q, k, v = grouped_forward(list(projs), x)
        # the normed q and k are cloned: RoPE rotates in place, which autograd forbids on a
        # view of a custom Function's output (the RMSNorm kernel returns one)
        if c.qk_norm:
            q = self.q_norm(q.view(B, S, c.num_heads, c.head_dim)).view(B, S, -1).clone()
            k = self.k_norm(k.view(B, S, c.num_kv_heads, c.head_dim)).view(B, S, -1).clone()
        elif c.qk_norm_full:
            q, k = self.q_norm(q).clone(), self.k_norm(k).clone()
        v = v.view(B, S, c.num_kv_heads, c.head_dim)
        if not self.rope:
            return q.view(B, S, c.num_heads, c.head_dim), k.view(B, S, c.num_kv_heads, c.head_dim), v
        if not rotate:
            return q, k, v
        # q and k as the projections' own [B, S, H·D] outputs: one RoPE launch for both
        q, k = ops.apply_rope_qk(q, k, c.num_heads, c.num_kv_heads, c.head_dim, cos, sin, position_ids)
        return q, k, v

    def _tables(self, cos, sin, local):
        if self.local_rope:
            if local is None:
                raise ValueError("this layer rotates with the model's rope_local tables; pass them")
            return local
        return cos, sin

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, S, _ = x.shape
        c = self.cfg
        cos, sin = self._tables(ctx.cos, ctx.sin, ctx.local)
        q, k, v = self._qkv(x, cos, sin, ctx.position_ids)
        o = ops.attention(q, k, v, scale=c.scale, causal=True, sliding_window=self.window,
                          softcap=c.attn_softcap, cu_seqlens=ctx.cu_seqlens,
                          max_seqlen=ctx.max_seqlen)
        return self.o_proj(o.reshape(B, S, c.num_heads * c.head_dim))

    def forward_cached(self, x: torch.Tensor, cos, sin, position_ids, cache: KVCache, layer: int,
                       local=None) -> torch.Tensor:
        B, S, _ = x.shape
        c = self.cfg
        cos, sin = self._tables(cos, sin, local)
        if cache.index is not None and self.rope and not c.fused_projections and not torch.is_grad_enabled():
            # a device-indexed step: the RoPE launch also stores k and v into the cache
            q, k, v = self._qkv(x, cos, sin, position_ids, rotate=False)
            k_all, v_all = cache.keys[layer], cache.values[layer]
            q, k = ops.apply_rope_qk_into_cache(q, k, v, c.num_heads, c.num_kv_heads, c.head_dim, cos, sin,
                                                position_ids, k_all, v_all, cache.index)
        else:
            q, k, v = self._qkv(x, cos, sin, position_ids)
            k_all, v_all = cache.append(layer, k, v)
        if cache.dense_prompt:  # the prompt's own attention, as the training forward's
            o = ops.attention(q, k, v, scale=c.scale, causal=True, sliding_window=self.window,
                              softcap=c.attn_softcap)
        else:
            o = cached_attention(q, k_all, v_all, cache.valid, start=cache.start, scale=c.scale,
                                 sliding_window=self.window, softcap=c.attn_softcap)
        return self.o_proj(o.reshape(B, S, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None) -> None:
        super().__init__()
        self.act = cfg.act
        self.intermediate = cfg.intermediate_size
        self.fused = cfg.fused_projections
        if self.fused:  # Phi-3: gate and up as one projection, gate the first half
            self.gate_up_proj = FrozenLinear(cfg.hidden_size, 2 * cfg.intermediate_size, False, dtype, device)
        else:
            self.gate_proj = FrozenLinear(cfg.hidden_size, cfg.intermediate_size, False, dtype, device)
            self.up_proj = FrozenLinear(cfg.hidden_size, cfg.intermediate_size, False, dtype, device)
        self.down_proj = FrozenLinear(cfg.intermediate_size, cfg.hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(ops.act_mul(gate, up, self.act))
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if fused_nf4_enabled(x) and all(p.adapter is None or hasattr(p.adapter, "lora_A") for p in projs):
            from ..ops.lora_mlp import lora_mlp  # one autograd Function, gate/up recomputed in backward

            return lora_mlp(x, *(p.proj() for p in projs), act=self.act)
        gate, up = grouped_forward([self.gate_proj, self.up_proj], x)
        return self.down_proj(ops.act_mul(gate, up, self.act))


class DecoderLayer(nn.Module):
    """``h + attn(norm(h))``, then ``h + mlp(norm(h))``; with Gemma 2's sandwich norms the
    attention output is normalized too (``post_attention_layernorm``) and the MLP runs between
    ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``; with OLMo 2's post norms
    only the outputs are normalized (``h + norm(attn(h))``); Granite scales each block's output
    by ``residual_multiplier``."""

    def __init__(self, cfg: ModelConfig, layer: int = 0, dtype=None, device=None) -> None:
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, dtype, device)  # noqa: E731
        self.sandwich, self.post = cfg.sandwich_norms, cfg.post_norms
        self.m = cfg.residual_multiplier
        if not self.post:  # OLMo 2's blocks read h as it is
            self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype, device)
        self.post_attention_layernorm = norm()
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
        if self.sandwich or self.post:
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg, dtype, device)

    def _attn_in(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.post else self.input_layernorm(h)

    def _attn_out(self, a: torch.Tensor) -> torch.Tensor:
        a = self.post_attention_layernorm(a) if (self.sandwich or self.post) else a
        return a if self.m == 1.0 else a * self.m

    def _mlp_modules(self) -> list[nn.Module]:
        if self.sandwich:
            return [self.pre_feedforward_layernorm, self.mlp, self.post_feedforward_layernorm]
        if self.post:
            return [self.mlp, self.post_feedforward_layernorm]
        return [self.post_attention_layernorm, self.mlp]

    def _mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            out = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        elif self.post:
            out = self.post_feedforward_layernorm(self.mlp(h))
        else:
            out = self.mlp(self.post_attention_layernorm(h))
        return out if self.m == 1.0 else out * self.m

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = h + self._attn_out(self.self_attn(self._attn_in(h), ctx))
        tokens = h.numel() // h.shape[-1]
        if torch.is_grad_enabled() and tokens > MLP_TILE_ABOVE:
            # long sequences: the MLP's intermediates (gate, up, product and their
            # gradients, ~8 × intermediate bytes a token) live for one tile at a time
            params = [p for m in self._mlp_modules() for p in m.parameters() if p.requires_grad]
            per_token = 8 * self.mlp.intermediate * h.element_size()
            return h + tiled_apply(self._mlp_block, h, params=params, bytes_per_token=per_token,
                                  budget_bytes=MLP_TILE_BYTES)
        return h + self._mlp_block(h)

    def forward_cached(self, h, cos, sin, position_ids, cache: KVCache, layer: int, local=None) -> torch.Tensor:
        h = h + self._attn_out(self.self_attn.forward_cached(self._attn_in(h), cos, sin, position_ids,
                                                             cache, layer, local))
        return h + self._mlp_block(h)


class Embedding(nn.Embedding):
    """The token table (frozen unless trained as a whole), Gemma's √hidden scale applied
    in the table's dtype as transformers does, and an optional LoRA adapter whose delta
    is added after the scale (PEFT wraps the scaled embedding module)."""

    def __init__(self, num: int, dim: int, scale: float = 1.0, dtype=None, device=None) -> None:
        super().__init__(num, dim, dtype=dtype, device=device)
        self.weight.requires_grad_(False)
        self.scale = scale
        self.bias = None  # read by tools that treat a tied table as the output projection
        self.adapter: nn.Module | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        if self.scale != 1.0:
            out = out * torch.tensor(self.scale, dtype=self.weight.dtype)
        if self.adapter is not None:
            out = out + self.adapter(ids, out.dtype)
        return out


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=None, device=None) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, dtype, device)
