"""Rotary embedding frequencies for the scalings that checkpoints use, and the cos/sin
tables ``[positions, rotary_dim/2]`` (fp32, attention scaling folded in) that the
``apply_rope`` op gathers by position id.

The inverse frequencies follow transformers' ``modeling_rope_utils`` formulas: default
``θ^(-2i/d)``; linear divides them by ``factor``; dynamic NTK raises the base for
sequences past the original length; llama3 rescales low and middle frequencies;
yarn blends interpolated and extrapolated frequencies and scales cos/sin; longrope (Phi-3's
long-context models) divides each frequency by its own factor, the short list up to the
original context and the long list past it, and scales cos/sin by √(1 + ln s / ln L₀).
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def _base_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exps)


def inv_freq_for(cfg: ModelConfig, seq_len: int | None = None, device=None,
                 rope: dict | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim/2], attention scaling) for ``rope`` (default: ``cfg.rope``).
    ``seq_len`` matters only for dynamic NTK."""
    p = rope if rope is not None else cfg.rope
    kind, theta, dim = p["rope_type"], float(p["rope_theta"]), cfg.rotary_dim
    if kind == "default":
        return _base_inv_freq(theta, dim, device), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, dim, device) / p["factor"], 1.0
    if kind == "dynamic":
        max_pos = cfg.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = p["factor"]
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, device), 1.0
    if kind == "llama3":
        return _llama3(p, _base_inv_freq(theta, dim, device)), 1.0
    if kind == "yarn":
        return _yarn(cfg, p, theta, dim, device)
    if kind == "longrope":
        return _longrope(cfg, p, theta, dim, seq_len, device)
    raise ValueError(f"unsupported rope type {kind!r}")


def _longrope(cfg: ModelConfig, p: dict, theta: float, dim: int, seq_len: int | None,
              device) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = p["long_factor"] if seq_len and seq_len > orig else p["short_factor"]
    if len(ext) != dim // 2:
        raise ValueError(f"longrope factors have {len(ext)} entries; head_dim {dim} needs {dim // 2}")
    ext = torch.tensor(ext, dtype=torch.float32, device=device)
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)), \
        float(attention_factor)


def _llama3(p: dict, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, p: dict, theta: float, dim: int, device) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryTables:
    """cos/sin tables for one model (or, with ``rope``, for its layers that use that rope:
    Gemma 3's sliding layers), grown on demand and (for dynamic NTK) recomputed the way
    transformers' ``dynamic_rope_update`` does: the frequencies follow the longest sequence
    seen and reset when a sequence within the original length comes."""

    def __init__(self, cfg: ModelConfig, rope: dict | None = None) -> None:
        self.cfg = cfg
        self.params = rope if rope is not None else cfg.rope
        # on the CPU explicitly: models are built under torch.device('meta')
        self.inv_freq, self.scaling = inv_freq_for(cfg, device="cpu", rope=self.params)
        self.original_inv_freq = self.inv_freq
        self.max_seq_len_cached = cfg.max_position_embeddings
        self._long = False  # longrope: whether the long factors are in use
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _update_dynamic(self, seq_len: int) -> None:
        original = self.cfg.max_position_embeddings
        if seq_len > self.max_seq_len_cached:
            self.inv_freq, self.scaling = inv_freq_for(self.cfg, seq_len, device="cpu", rope=self.params)
            self.max_seq_len_cached = seq_len
            self._tables.clear()
        if seq_len < original and self.max_seq_len_cached > original:
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = original
            self._tables.clear()

    def _update_longrope(self, seq_len: int) -> None:
        # as transformers' longrope_frequency_update: the long factors while the positions
        # reach past the original context, the short ones otherwise
        long = seq_len > self.params["original_max_position_embeddings"]
        if long != self._long:
            self._long = long
            self.inv_freq, self.scaling = inv_freq_for(self.cfg, seq_len if long else None, device="cpu",
                                                       rope=self.params)
            self._tables.clear()

    def get(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables covering positions ``0..seq_len-1`` (at least) on ``device``."""
        if self.params["rope_type"] == "dynamic":
            self._update_dynamic(seq_len)
        elif self.params["rope_type"] == "longrope":
            self._update_longrope(seq_len)
        cached = self._tables.get(device)
        if cached is not None and cached[0].shape[0] >= seq_len:
            return cached
        n = max(seq_len, min(self.cfg.max_position_embeddings, 8192))
        # Same arithmetic as transformers: fp32 outer product of positions and frequencies.
        pos = torch.arange(n, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(device=device, dtype=torch.float32)[None, :]
        tables = (freqs.cos() * self.scaling, freqs.sin() * self.scaling)
        self._tables[device] = tables
        return tables
