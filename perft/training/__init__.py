"""Fine-tuning: `perft train` and its pieces (config, loop, checkpoints, distributed, HF integration)."""

from perft.training.args import TrainingConfig
from perft.training.state import NonFiniteLoss, TrainResult
from perft.training.trainer import train

__all__ = ["NonFiniteLoss", "TrainResult", "TrainingConfig", "train"]
