"""The on-disk sparse-logit cache: format, writer, reader, manifest.

The byte layout is specified in ``README.md`` next to this file.
"""

from megatron_slkd.cache.format import Encoding, ValueKind, encoding_for
from megatron_slkd.cache.manifest import MANIFEST_NAME, Manifest
from megatron_slkd.cache.reader import SparseKDCache, SparseRows, open_cache
from megatron_slkd.cache.writer import ShardWriter

__all__ = [
    "open_cache",
    "SparseKDCache",
    "SparseRows",
    "ShardWriter",
    "Manifest",
    "MANIFEST_NAME",
    "Encoding",
    "ValueKind",
    "encoding_for",
]
