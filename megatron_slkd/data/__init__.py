"""Data preparation and Megatron IndexedDataset glue."""

from megatron_slkd.data.indexed import dataset_fingerprint, iter_token_blocks, open_dataset
from megatron_slkd.data.prepare import PrepareConfig, prepare_data, read_meta
from megatron_slkd.data.tokenizers import load_tokenizer

__all__ = [
    "PrepareConfig",
    "prepare_data",
    "read_meta",
    "load_tokenizer",
    "open_dataset",
    "iter_token_blocks",
    "dataset_fingerprint",
]
