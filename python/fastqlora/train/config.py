"""The settings of a training run, from flags or a YAML/TOML file, with checks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lora import LINEAR_TARGETS

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")


@dataclass
class TrainConfig:
    model: str
    dataset: str
    output_dir: str = "fastqlora-out"
    max_seq_length: int = 2048
    load_in_4bit: bool = True
    dtype: str | None = None  # None: bf16 where the GPU has it, else fp16; fp32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    # LoRA
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_TARGETS))
    use_gradient_checkpointing: bool | str = True
    # data
    packing: bool = True
    completion_only: bool = False
    # optimization
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    max_steps: int | None = None
    num_epochs: float = 1.0
    optim: str = "adamw"
    # replay each step from a CUDA graph (train/step_graph.py): rows padded to the longest
    # row's width. "auto": where the settings allow it (graph_blockers), on CUDA devices, with
    # rows (packed or not) that this padding grows by at most a third over eager steps
    cuda_graph: bool | str = "auto"
    seed: int = 3407
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 0  # keep only the newest this many checkpoint-N folders (0: all)
    eval_dataset: str | None = None  # a JSONL file to measure the loss on (never trained on)
    eval_split: float = 0.0  # else: this share of the dataset's examples held out for it
    eval_steps: int = 0  # evaluate every this many steps (0: at the end only, when there is an eval set)
    resume: bool = False
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("max_seq_length", "r", "batch_size", "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {self.num_epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {self.lr_scheduler!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.warmup_steps < 0 or self.save_steps < 0 or self.eval_steps < 0 or self.save_total_limit < 0:
            raise ValueError("warmup_steps, save_steps, save_total_limit and eval_steps must not be negative")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split is a share of the examples, in [0, 1); got {self.eval_split}")
        if self.eval_dataset and self.eval_split:
            raise ValueError("give eval_dataset or eval_split, not both")
        if isinstance(self.cuda_graph, str) and self.cuda_graph.lower() in ("true", "false"):
            self.cuda_graph = self.cuda_graph.lower() == "true"  # from a config file's string
        if self.cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be true, false or 'auto', got {self.cuda_graph!r}")
        if self.cuda_graph is True and self.graph_blockers():
            raise ValueError("cuda_graph=True replays one whole step: it needs optim='adamw' and checkpointing "
                             f"without offload; got {self.optim!r}, {self.use_gradient_checkpointing!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def graph_blockers(self) -> list[str]:
        """The settings that keep a step from being replayed as one CUDA graph (empty: none)."""
        out = []
        if self.optim != "adamw":
            out.append("optim")
        if self.use_gradient_checkpointing in ("offload", "unsloth"):
            out.append("use_gradient_checkpointing")
        return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .yaml/.yml/.toml/.json file; unknown keys are a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        import json

        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: use .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return data
