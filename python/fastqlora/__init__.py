"""fastqlora: fast, memory-lean QLoRA and LoRA finetuning.

The public entry point is :class:`FastLanguageModel` (``from fastqlora import
FastLanguageModel``); the layers beneath it are described in DESIGN.md.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FastLanguageModel", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import fastqlora` stays light (the CLI imports torch only when needed).
    if name == "FastLanguageModel":
        from .api import FastLanguageModel

        return FastLanguageModel
    raise AttributeError(f"module 'fastqlora' has no attribute {name!r}")
