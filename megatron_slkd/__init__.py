"""megatron-slkd: offline sparse-logit knowledge distillation for Megatron pretraining.

A teacher runs once over a Megatron indexed dataset and stores, for every
token, a few sampled (id, count) pairs (Random Sampling KD); a student then
pretrains on megatron-core with a vocab-parallel loss on those targets.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
