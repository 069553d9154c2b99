"""Training: JSONL data, padding-free packing, the loop, checkpoints, progress."""
from .config import TrainConfig
from .loop import Trainer
from .step_graph import GraphedTrainStep

__all__ = ["GraphedTrainStep", "TrainConfig", "Trainer"]
