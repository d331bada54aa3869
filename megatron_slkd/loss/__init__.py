"""The vocab-parallel sparse knowledge-distillation loss."""

from megatron_slkd.loss.vocab_parallel import SparseKDLoss, vocab_parallel_sparse_kd_loss

__all__ = ["vocab_parallel_sparse_kd_loss", "SparseKDLoss"]
