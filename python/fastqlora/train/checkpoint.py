"""Training checkpoints that resume exactly: adapter, optimizer, schedule, RNG, data
position and loss history, written atomically (a folder is complete or absent)."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..ops import dropout as lora_dropout_state

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from: Python's, torch's, and LoRA dropout's device seed
    counters (ops/dropout.py)."""
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state(),
             "lora_dropout": lora_dropout_state.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    lora_dropout_state.set_state(state.get("lora_dropout", {}))


def save_checkpoint(output_dir: str | Path, step: int, model, trainer_state: dict[str, Any]) -> Path:
    """Write ``checkpoint-{step}`` under ``output_dir``: the adapter in PEFT format plus
    the trainer state. Written to a temporary folder first, then renamed."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if (p / STATE_FILE).is_file())


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep = 0: none deleted); returns the
    deleted folders."""
    if keep <= 0:
        return []
    old = [p for _, p in _checkpoints(Path(output_dir))[:-keep]]
    for p in old:
        shutil.rmtree(p)
    return old


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = _checkpoints(Path(output_dir))
    return found[-1][1] if found else None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {checkpoint} is not a complete fastqlora checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)
