"""Training: JSONL data, padding-free packing, the loop, checkpoints, progress."""
from .config import TrainConfig
from .loop import Trainer

__all__ = ["TrainConfig", "Trainer"]
