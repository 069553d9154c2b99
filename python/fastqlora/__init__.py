"""fastqlora: fast, memory-lean QLoRA and LoRA finetuning.

The public entry point is :class:`FastLanguageModel` (``from fastqlora import
FastLanguageModel``); the layers beneath it are described in DESIGN.md.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
