"""``ModelConfig``: one decoder's shape and family switches (``families.py`` fills it from
``config.json``).

Families differ only in fields (gpt-fast style), never in subclasses:
``norm_offset`` (Gemma's ``1 + w``), ``act`` (SwiGLU "silu" or GeGLU "gelu_tanh"),
``embed_scale`` (Gemma's √hidden), ``layer_windows`` (each layer's sliding window or None:
Mistral's every layer, Gemma 2's every other one, Qwen's past ``max_window_layers``),
``attn_softcap`` and ``final_softcap`` (Gemma 2), ``attn_scale`` (Gemma's
``query_pre_attn_scalar``), ``attention_bias`` / ``o_bias`` (Qwen 2's q, k, v biases),
``qk_norm`` (Qwen 3's and Gemma 3's per-head RMSNorm of q and k before RoPE),
``sandwich_norms`` (Gemma 2's and 3's norms after attention and around the MLP),
``rope_local`` (Gemma 3's own RoPE for the sliding layers), ``fused_projections`` (Phi-3's
one ``qkv_proj`` and one ``gate_up_proj``), ``partial_rotary_factor`` (Phi-4-mini),
``rope_layers`` (SmolLM3's layers without RoPE), ``input_multiplier`` /
``residual_multiplier`` / ``logits_scaling`` (Granite's scales), ``post_norms`` and
``qk_norm_full`` (OLMo 2: norms on each block's output instead of its input, q and k
normalized over the whole projection), ``tie_word_embeddings``.

An image-text checkpoint whose text model is one of these families is read as that text
model: ``wrapper`` names the outer type and ``wrapper_raw`` keeps its config.json, so that
loading, adapters and merged checkpoints use the outer model's names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_local: dict[str, Any] | None = None  # the sliding layers' RoPE when it differs (Gemma 3)
    tie_word_embeddings: bool = False
    norm_offset: float = 0.0
    act: str = "silu"
    embed_scale: float = 1.0
    sliding_window: int | None = None  # the window of the layers that slide (layer_windows)
    layer_windows: tuple[int | None, ...] = ()  # each layer's window; () = every layer full
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attention_bias: bool = False  # q, k and v projections
    o_bias: bool = False  # the output projection
    qk_norm: bool = False
    sandwich_norms: bool = False
    fused_projections: bool = False
    partial_rotary_factor: float = 1.0  # the share of each head that RoPE rotates (Phi-4-mini: 0.75)
    rope_layers: tuple[bool, ...] = ()  # per layer, whether it applies RoPE; () = every layer does
    input_multiplier: float = 1.0  # Granite: the model multiplies its input embeddings (given ones too)
    residual_multiplier: float = 1.0  # Granite: h + m·block(h)
    logits_scaling: float = 1.0  # Granite: logits / s
    post_norms: bool = False  # OLMo 2: h + norm(block(h)), no input norms
    qk_norm_full: bool = False  # OLMo 2: q and k RMS-normalized over all heads at once
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    source: str = ""  # the config file, for error messages
    wrapper: str | None = None  # the image-text model_type this text model was read from
    wrapper_raw: dict[str, Any] = field(default_factory=dict, repr=False)  # its config.json
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def rope_type(self) -> str:
        return self.rope["rope_type"]

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that RoPE rotates (all unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer] if self.rope_layers else True

    def local_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` rotates with ``rope_local`` (a sliding layer of Gemma 3)."""
        return self.rope_local is not None and self.window(layer) is not None

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: it attends to every earlier token)."""
        return self.layer_windows[layer] if self.layer_windows else None

    def validate(self) -> ModelConfig:
        where = f" in {self.source}" if self.source else ""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {key}={value!r}{where} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads}{where} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}{where} must be even for rotary embeddings")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor}{where} must leave an even, "
                             f"non-zero number of rotated dimensions of head_dim={self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps}{where} must be positive")
        for name, rope in (("rope", self.rope), ("the sliding layers' rope", self.rope_local)):
            if rope is not None:
                _validate_rope(rope, name, where)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window={self.sliding_window!r}{where} must be a positive integer or null")
        if self.rope_layers and len(self.rope_layers) != self.num_layers:
            raise ValueError(f"no_rope_layers{where} lists {len(self.rope_layers)} layers but num_hidden_layers="
                             f"{self.num_layers}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_types{where} lists {len(self.layer_windows)} layers but num_hidden_layers="
                             f"{self.num_layers}")
        return self


def _validate_rope(rope: dict[str, Any], name: str, where: str) -> None:
    kind = rope.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r}{where} is not supported; supported: {ROPE_TYPES}")
    theta = rope.get("rope_theta")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"rope_theta={theta!r} ({name}){where} must be a positive number")
    if kind in ("linear", "dynamic", "llama3") and not rope.get("factor", 0) > 0:
        raise ValueError(f"rope scaling {kind!r}{where} needs a positive 'factor'")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rope:
                raise ValueError(f"rope scaling 'llama3'{where} needs '{key}'")
    if kind == "longrope":
        for key in ("long_factor", "short_factor"):
            if not isinstance(rope.get(key), list):
                raise ValueError(f"rope scaling 'longrope'{where} needs '{key}', a list of head_dim / 2 numbers")
