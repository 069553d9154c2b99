"""``CausalLM``: the decoder stack plus the lm_head, the loss, and generation hooks.

``forward`` takes what transformers' causal LMs take and returns their output type
(``.loss``, ``.logits``), so transformers' Trainer and trl's SFTTrainer drive it
unchanged. Sequence boundaries inside a row — a 0/1 padding mask whose ones are
contiguous, or position ids that restart (packed rows) — become ``cu_seqlens`` so that
attention never crosses them.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import ops
from ..checkpointing import run_layers
from ..offload import OffloadArenaCache
from ..decode_graph import DecodeGraph
from ..generation import KVCache, generate
from ..lora import LoraAdapter, cast_all, next_cast_epoch
from ..ops.dispatch import decode_graph_enabled, grouped_lora_enabled
from ..ops.lora_decode import decoding
from ..ops.lora_linear import compute_dtype
from .config import ModelConfig
from .decoder import Context, DecoderModel
from .linear import FrozenLinear, group_adapters
from .rope import RotaryTables

IGNORE_INDEX = -100


def sequence_layout(batch: int, seq: int, device: torch.device, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position ids ``[B, S]``, cu_seqlens over the flattened tokens or None).

    A boundary starts wherever the padding mask changes value or the position ids do not
    continue by one. Without either, positions are ``0..S-1`` (as transformers does in
    a plain forward) and each row is one sequence."""
    if attention_mask is None and position_ids is None:  # one sequence a row; nothing to read back
        return torch.arange(seq, device=device).expand(batch, seq), None
    starts = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq)}")
        m = attention_mask.to(torch.int8)
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        changes = (m[:, 1:] != m[:, :-1]).sum(1)
        if bool((changes > 1).any()):
            raise ValueError("attention_mask must be contiguous in each row (left or right padding); "
                             "for several sequences in one row pass restarting position_ids instead")
        starts[:, 1:] |= m[:, 1:] != m[:, :-1]
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
    else:
        if position_ids.shape != (batch, seq):
            position_ids = position_ids.expand(batch, seq)
        starts[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return position_ids, None
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([idx, torch.tensor([batch * seq], device=device)]).to(torch.int32)
    return position_ids, cu


# what fastqlora.generation.generate takes besides the ids and the mask
_GENERATE_ARGS = frozenset(inspect.signature(generate).parameters) - {"model", "input_ids", "attention_mask"}


class CausalLM(nn.Module):
    main_input_name = "input_ids"

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg, dtype, device)
        self.lm_head = None if cfg.tie_word_embeddings else FrozenLinear(
            cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        self.rope = RotaryTables(cfg)
        self.rope_local = RotaryTables(cfg, cfg.rope_local) if cfg.rope_local is not None else None
        self.passthrough: list = []  # (file, key, pre-quantized): an image-text checkpoint's other tensors
        self.generation_eos: list[int] = []  # generation_config.json's stop tokens (set by the loader)
        self.gradient_checkpointing: str = "off"  # "off", "checkpoint" or "offload"
        self.return_logits_with_loss = False

    # -- properties transformers' tooling reads ---------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def config(self):
        """A transformers ``PretrainedConfig`` of the same checkpoint, for the tools that
        read one (Trainer, trl); the model itself reads ``self.cfg``."""
        if getattr(self, "_hf_config", None) is None:
            from transformers import AutoConfig

            raw = {k: v for k, v in self.cfg.raw.items() if k not in ("model_type", "quantization_config")}
            hf = AutoConfig.for_model(self.cfg.model_type, **raw)
            hf._attn_implementation = "sdpa"
            # where the weights came from (trl loads a reference model from it when asked to)
            hf._name_or_path = str(getattr(self, "name_or_path", "") or "")
            object.__setattr__(self, "_hf_config", hf)
        return self._hf_config

    @property
    def generation_config(self):
        """transformers' GenerationConfig of this model (trl reads and edits its token ids)."""
        if getattr(self, "_generation_config", None) is None:
            from transformers import GenerationConfig

            object.__setattr__(self, "_generation_config", GenerationConfig.from_model_config(self.config))
        return self._generation_config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """transformers' switch (Trainer calls it); keeps "offload" if that was chosen."""
        if self.gradient_checkpointing == "off":
            self.gradient_checkpointing = "checkpoint"

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = "off"

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing != "off"

    def enable_input_require_grads(self) -> None:
        """Not needed: checkpointing here does not rely on inputs requiring grad."""

    def base_model(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        """The backbone alone (transformers' ``base_model``): final hidden states, which
        trl's SFTTrainer projects through ``get_output_embeddings()`` with its own loss."""
        from transformers.modeling_outputs import BaseModelOutputWithPast

        graphed = getattr(self, "_graphed_backbone", None)
        if (graphed is not None and inputs_embeds is None and self.training and torch.is_grad_enabled()):
            h = graphed({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                         **kwargs})
            if h is not None:  # else this batch runs eagerly below
                return BaseModelOutputWithPast(last_hidden_state=h)
        h = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds,
                               kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
        return BaseModelOutputWithPast(last_hidden_state=h)

    def add_model_tags(self, tags) -> None:
        """transformers' hook for model-card tags (trl calls it); nothing to record here."""

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head if self.lm_head is not None else self.model.embed_tokens

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def lm_head_weight(self) -> torch.Tensor:
        """The output projection ``[vocab, hidden]``, LoRA delta included when attached."""
        if self.lm_head is None:
            w = self.model.embed_tokens.weight
            adapter = None
        else:
            w = self.lm_head.dense_weight()
            adapter = self.lm_head.adapter
        if adapter is not None:
            w = w + adapter.delta_weight().to(w.dtype)
        return w

    def _adapter_groups(self) -> list:
        """Each layer's adapters that run as one grouped op (q, k, v; gate, up), so the
        forward's cast writes their A stacked."""
        groups = []
        if not grouped_lora_enabled():
            return groups
        for layer in self.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for names, mod in ((("q_proj", "k_proj", "v_proj"), att), (("gate_proj", "up_proj"), mlp)):
                projs = [getattr(mod, n, None) for n in names]
                if all(p is not None for p in projs):
                    ads = group_adapters(projs)
                    if ads is not None:
                        groups.append(ads)
        return groups

    # -- forward ----------------------------------------------------------------------
    def _run_layers(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        mode = self.gradient_checkpointing if (self.training and torch.is_grad_enabled()) else "off"
        if mode == "offload" and getattr(self, "_offload_cache", None) is None:
            object.__setattr__(self, "_offload_cache", OffloadArenaCache())  # one per model, not a submodule
        return run_layers(self.model.layers, h, ctx, mode, arena_cache=getattr(self, "_offload_cache", None))

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                      cu_seqlens=None, max_seqlen=None):
        """The final norm's output ``[B, S, H]``. ``cu_seqlens`` (int32 ``[n+1]`` over the
        flattened B·S tokens; trailing repeats of B·S are empty sequences) with ``max_seqlen``
        (an int at least the longest sequence) and restarting ``position_ids`` give packed
        sequences' boundaries without the host reading them (a CUDA graph can replay such a
        step): position ids must then restart at 0 for each sequence, below max_seqlen."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if (cu_seqlens is None) != (max_seqlen is None) or (cu_seqlens is not None and position_ids is None):
            raise ValueError("cu_seqlens (cu_seq_lens_q) needs max_seqlen (max_length_q) and position_ids with it")
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("pass either attention_mask or cu_seqlens (cu_seq_lens_q), not both")
        next_cast_epoch()  # adapters' 16-bit copies of A and B are cast anew for this forward
        h = self._inputs(self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        adapters = [m for m in self.model.layers.modules() if isinstance(m, LoraAdapter)]
        if adapters:  # all at once, in the dtype the projections will compute in
            cast_all(adapters, compute_dtype(h), self._adapter_groups())
        B, S = h.shape[:2]
        if cu_seqlens is not None:  # the caller's layout: nothing read back
            if position_ids.shape != (B, S):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(B, S)}")
            cu = cu_seqlens.to(device=h.device, dtype=torch.int32)
            n = max_len = int(max_seqlen)  # positions restart at 0, so the table needs no more
        else:
            generated = position_ids is None
            position_ids, cu = sequence_layout(B, S, h.device, attention_mask, position_ids)
            # the table length without reading the ids back (a device sync) when they are 0..S-1
            n = S if generated else int(position_ids.max()) + 1
            max_len = int((cu[1:] - cu[:-1]).max()) if cu is not None else None
        cos, sin, local = self.rope_tables(n, h.device)
        h = self._run_layers(h, Context(cos, sin, position_ids, cu, max_len, local))
        return self.model.norm(h)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, inputs_embeds=None, return_logits: bool | None = None, **kwargs):
        """transformers-style causal LM forward. The loss predicts token t+1 at t and
        ignores -100; it is the mean over counted tokens, or their sum divided by
        ``num_items_in_batch`` when given (gradient accumulation). Logits are returned
        without labels, and with them only when asked (``return_logits=True``), since
        the fused loss never builds them. ``cu_seq_lens_q`` and ``max_length_q`` (the names
        transformers' flattening collator uses) give packed sequences' boundaries as
        :meth:`hidden_states` describes."""
        graphed = getattr(self, "_graphed_loss", None)
        if (graphed is not None and not graphed.inside and labels is not None and inputs_embeds is None
                and not return_logits and not self.return_logits_with_loss and self.training
                and torch.is_grad_enabled()
                and not any(v is not None and v is not False for k, v in kwargs.items()
                            if k not in ("use_cache", "return_dict"))):
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                     "labels": labels, "num_items_in_batch": num_items_in_batch}
            loss = graphed({k: v for k, v in batch.items() if v is not None})
            if loss is not None:  # else this batch runs eagerly below
                return CausalLMOutputWithPast(loss=loss, logits=None)
        h = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds,
                               kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
        w = self.lm_head_weight()
        loss = None
        if labels is not None:
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            # Granite's logits / s, as (h / s)·Wᵀ: the fused loss never holds the logits
            # (the same numbers when s is a power of two, as Granite's are)
            hs = h if self.cfg.logits_scaling == 1.0 else h / self.cfg.logits_scaling
            loss = ops.linear_cross_entropy(hs, w, shifted, ignore_index=IGNORE_INDEX, num_items=num_items_in_batch,
                                            softcap=self.cfg.final_softcap)
        if return_logits is None:
            return_logits = labels is None or self.return_logits_with_loss
        logits = None
        if return_logits:
            logits = self._head(h, w)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _inputs(self, embeds: torch.Tensor) -> torch.Tensor:
        """Granite multiplies the input embeddings in the model, given ones included."""
        m = self.cfg.input_multiplier
        return embeds if m == 1.0 else embeds * m

    def _head(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Logits as transformers computes them: h·Wᵀ, Granite's division, the final soft-cap."""
        logits = F.linear(h, w)
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        if self.cfg.final_softcap is not None:
            logits = self.cfg.final_softcap * torch.tanh(logits / self.cfg.final_softcap)
        return logits

    # -- generation -------------------------------------------------------------------
    @property
    def rope_switch_length(self) -> int | None:
        """With longrope, the original context past which RoPE changes factors (generation
        then recomputes its cache once); None otherwise."""
        if self.cfg.rope_type == "longrope":
            return int(self.cfg.rope["original_max_position_embeddings"])
        return None

    def allocate_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_layers, batch, capacity, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def rope_tables(self, n: int, device: torch.device):
        """(cos, sin, local or None): the RoPE tables covering positions 0..n-1 on ``device``."""
        cos, sin = self.rope.get(n, device)
        local = self.rope_local.get(n, device) if self.rope_local is not None else None
        return cos, sin, local

    def _step(self, ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, tables=None) -> torch.Tensor:
        """The layers over ``ids`` with the cache, the last position's logits. The caller
        advances ``cache.length``. ``tables``: RoPE tables covering every position, given by
        the step that is captured as a CUDA graph (it may not read the largest position id
        back)."""
        h = self._inputs(self.model.embed_tokens(ids))
        cos, sin, local = tables if tables is not None else self.rope_tables(int(position_ids.max()) + 1, h.device)
        with decoding(graphed=tables is not None):  # few-row NF4 projections may take the decode kernels
            for i, layer in enumerate(self.model.layers):
                h = layer.forward_cached(h, cos, sin, position_ids, cache, i, local)
        h = self.model.norm(h[:, -1:])
        return self._head(h, self.lm_head_weight())[:, -1]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        B, S = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        # positions count real tokens, as transformers' generate does for left padding
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache.valid[:, :S] = mask.bool()
        # without holes the prompt attends to itself as in training (the flash kernels, no
        # [S, S] scores); one read of the mask a generate() call
        cache.dense_prompt = cache.length == 0 and (attention_mask is None or bool(mask.all()))
        cache.positions = pos[:, -1] + 1
        try:
            logits = self._step(input_ids, pos, cache)
        finally:
            cache.dense_prompt = False  # later steps read the cache
        cache.length += S
        return logits

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        n = tokens.shape[1]
        cache.valid[:, cache.length:cache.length + n] = True
        pos = cache.positions[:, None] + torch.arange(n, device=tokens.device)[None]
        cache.positions = cache.positions + n
        logits = self._step(tokens, pos, cache)
        cache.length += n
        return logits

    # -- the decode step with every changing value on the device (fastqlora.decode_graph) --
    @property
    def static_rope(self) -> bool:
        """Whether one RoPE table serves every position (dynamic NTK and longrope change
        theirs with the sequence length, so their steps stay eager)."""
        types = [self.rope.params["rope_type"]]
        if self.rope_local is not None:
            types.append(self.rope_local.params["rope_type"])
        return not any(t in ("dynamic", "longrope") for t in types)

    def static_decode(self, tokens: torch.Tensor, cache: KVCache, tables) -> torch.Tensor:
        """decode() of one token a row with ``cache.index`` set: the new position marked
        valid, the position ids advanced and the index moved, all in place on the device,
        so that the step can be captured once and replayed. The caller advances ``length``."""
        cache.valid.index_fill_(1, cache.index, True)
        pos = cache.positions[:, None].clone()
        cache.positions.add_(1)
        logits = self._step(tokens, pos, cache, tables)
        cache.index.add_(1)
        return logits

    def decode_graph(self, cache: KVCache) -> DecodeGraph | None:
        """The decode step for this cache as a CUDA graph (captured on its second call,
        replayed from then on), or None where it does not apply: not CUDA,
        FASTQLORA_DECODE_GRAPH=0, a RoPE whose tables change with the length."""
        if not (cache.valid.is_cuda and decode_graph_enabled() and self.static_rope):
            return None
        return DecodeGraph(self, cache)

    def stop_ids(self, extra: list[int | None] | None = None) -> list[int]:
        """Every token that ends generation: config.json's eos, generation_config.json's (an
        instruct model's end of turn) and ``extra`` (say, the tokenizer's eos)."""
        eos = self.cfg.eos_token_id
        ids = (eos if isinstance(eos, list) else [eos]) + list(self.generation_eos) + list(extra or [])
        return list(dict.fromkeys(i for i in ids if isinstance(i, int)))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Greedy or sampled generation with a KV cache (see fastqlora.generation)."""
        was_training = self.training
        self.eval()
        try:
            if kwargs.get("eos_token_id") is None:
                kwargs["eos_token_id"] = self.stop_ids()
            if kwargs.get("pad_token_id") is None:
                kwargs["pad_token_id"] = self.cfg.pad_token_id
            kwargs.pop("use_cache", None)
            unknown = sorted(set(kwargs) - _GENERATE_ARGS)
            if unknown:
                raise TypeError(f"generate() does not take {', '.join(unknown)}: it decodes greedily or by sampling "
                                f"(no beam search) and takes {', '.join(sorted(_GENERATE_ARGS))}")
            return generate(self, input_ids, attention_mask, **kwargs)
        finally:
            self.train(was_training)
