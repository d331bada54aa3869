"""Student pretraining on megatron-core with sparse-logit distillation (``slkd train``)."""

from megatron_slkd.training.config import TrainConfig, load_config
from megatron_slkd.training.loop import train

__all__ = ["TrainConfig", "load_config", "train"]
