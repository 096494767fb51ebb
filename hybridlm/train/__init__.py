"""Train a hybrid from scratch: `train(TrainConfig(data=[...], out=...))`, or `hybridlm train` on the CLI."""
from hybridlm.train.recipe import TrainConfig
from hybridlm.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
