"""Reading a Megatron IndexedDataset for the offline tools, checked when opened.

A cache row is keyed by (document, offset) where "document" is a sequence of
the IndexedDataset (``prepare-data`` writes one sequence per document, as
Megatron's ``preprocess_data.py`` does without sentence splitting).

The files are megatron-core's (``megatron/core/datasets/indexed_dataset.py``,
written by its ``IndexedDatasetBuilder``). ``PREFIX.idx``, little-endian:

=======  =====================  ==============================================
bytes    field                  value
=======  =====================  ==============================================
9        magic                  ``MMIDIDX\\x00\\x00``
8        version                u64, 1
1        dtype code             u8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                6 float64, 7 float32, 8 uint16
8        sequence count S       u64
8        document count D       u64 (entries of the document index below)
4 S      sequence lengths       i32, tokens per sequence
8 S      sequence pointers      i64, byte offset of each sequence in ``.bin``
8 D      document index         i64, first sequence of each document, then S
=======  =====================  ==============================================

(a multimodal index follows with one i8 mode per sequence, which text never
reads). ``PREFIX.bin`` holds the tokens, in the dtype given.

The training path reads the data through megatron-core itself; the commands
that only check, scan or key the data (``build-cache``, ``verify-cache``,
``remap-cache``, ``describe-data``, the checks before training) read it here,
which costs no megatron-core import (about 3 s per command on 2 cores). Every
structural fault, the kind an interrupted copy leaves, is found when the
dataset is opened, before a teacher or student loads, as a
:class:`~megatron_slkd.errors.DataFormatError` naming the file; megatron-core
would fail on it with an assertion or a NumPy error, or, for a data file cut
short, only when a sample reaches the missing tokens, mid-run.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from megatron_slkd.errors import DataFormatError, DataMismatchError

__all__ = ["IndexedData", "open_dataset", "check_files", "index_key", "index_keys",
           "iter_token_blocks", "dataset_fingerprint"]  # fmt: skip

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
           6: np.float64, 7: np.float32, 8: np.uint16}  # fmt: skip


class IndexedData:
    """A Megatron IndexedDataset opened read-only and checked (see the module docstring).

    Attributes:
        prefix: the path prefix of ``PREFIX.bin`` / ``PREFIX.idx``.
        dtype: the token dtype.
        sequence_lengths: ``[S]`` int32, tokens per sequence (a view of the index).
        sequence_pointers: ``[S]`` int64, byte offset of each sequence in ``.bin``.
        document_indices: ``[D]`` int64, first sequence of each document, then S.
        bin_bytes: the size of ``PREFIX.bin``.

    Arrays it returns are read-only views of its memory maps.

    Raises:
        DataFormatError: a file is missing, the index is not megatron-core's (magic,
            version, dtype code), it is shorter than its header announces, its values
            are impossible, or it points past the end of ``.bin``.
        DataMismatchError: ``.bin`` is empty (no document has a token).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = str(prefix)
        idx, binary = self.prefix + ".idx", self.prefix + ".bin"
        self.bin_bytes = _bin_bytes(self.prefix)
        self._read_index(idx)
        self._check_pointers()
        # A memoryview keeps the map open for as long as any array read from it lives.
        self._bin = memoryview(np.memmap(binary, dtype=np.uint8, mode="r"))

    def _read_index(self, idx: str) -> None:
        with open(idx, "rb") as f:
            self.dtype, seqs, docs = _read_header(f, idx)
        buf = memoryview(np.memmap(idx, dtype=np.uint8, mode="r"))
        at = _HEADER.size
        self.sequence_lengths = np.frombuffer(buf, np.int32, seqs, at)
        self.sequence_pointers = np.frombuffer(buf, np.int64, seqs, at + 4 * seqs)
        self.document_indices = np.frombuffer(buf, np.int64, docs, at + 12 * seqs)
        if seqs and int(self.sequence_lengths.min()) < 0:
            d = int(np.argmax(self.sequence_lengths < 0))
            raise DataFormatError(
                f"{idx}: sequence {d} has length {int(self.sequence_lengths[d])}: the index "
                "is damaged; write it again"
            )
        bounds = self.document_indices
        if docs and (int(bounds[0]) < 0 or int(bounds[-1]) > seqs
                     or bool(np.any(np.diff(bounds) < 0))):  # fmt: skip
            raise DataFormatError(
                f"{idx}: its document index is not an ordered list of sequence numbers "
                f"0..{seqs}: the index is damaged; write it again"
            )

    def _check_pointers(self) -> None:
        if not len(self.sequence_lengths):
            return
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        last = int(np.argmax(ends))
        first = int(self.sequence_pointers.min())
        if int(ends[last]) > self.bin_bytes or first < 0:
            raise _past_end(self.prefix, int(ends[last]), self.bin_bytes, last, len(ends))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of sequence ``idx`` (to its end when
        ``length`` is None), as megatron-core's ``IndexedDataset.get`` returns them."""
        n = int(self.sequence_lengths[idx]) - offset if length is None else length
        return self.read(int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize, n)

    def read(self, byte_offset: int, count: int) -> np.ndarray:
        """``count`` tokens from ``byte_offset`` of ``.bin``."""
        return np.frombuffer(self._bin, dtype=self.dtype, count=count, offset=byte_offset)


def _bin_bytes(prefix: str) -> int:
    """The size of ``PREFIX.bin``, both files being there and ``.bin`` not empty."""
    idx, binary = prefix + ".idx", prefix + ".bin"
    for path in (binary, idx):
        if not Path(path).is_file():
            raise DataFormatError(f"{path}: dataset file not found{prefix_hint(prefix)}")
    size = os.path.getsize(binary)
    if size == 0:
        raise DataMismatchError(
            f"{binary} is empty: the dataset holds no token (no document, or only empty "
            "ones); there is nothing to distill or train on"
        )
    return size


def prefix_hint(prefix: str) -> str:
    """What ``prefix``, whose files are missing, most likely meant (Megatron names a dataset
    by its path without ``.bin``/``.idx``): "" when nothing near it is a dataset."""
    p = Path(prefix)
    if p.suffix in (".bin", ".idx") and Path(str(p.with_suffix("")) + ".idx").is_file():
        return f"; a data prefix is the path without .bin/.idx: {p.with_suffix('')}"
    if p.is_dir():
        found = sorted(str(x)[: -len(".idx")] for x in p.glob("*.idx"))
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            return (f"; {p} is a directory; a data prefix names the files in it without "
                    f".bin/.idx: {', '.join(found[:3])}{more}")  # fmt: skip
    return ""


def _read_header(f: BinaryIO, idx: str) -> tuple[np.dtype, int, int]:
    """(dtype, S, D) of the index ``idx`` open as ``f``, checked against its size."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(_MAGIC):
        raise DataFormatError(
            f"{idx}: not a megatron-core index (starts with {head[:9]!r}, expected "
            f"{_MAGIC!r}); write the dataset with Megatron-LM's preprocess_data.py or "
            "`slkd prepare-data`"
        )
    _, version, code, seqs, docs = _HEADER.unpack(head)
    if version != _VERSION:
        raise DataFormatError(
            f"{idx}: index version {version}, this reader knows version {_VERSION}"
        )
    if code not in _DTYPES or not np.issubdtype(_DTYPES[code], np.integer):
        name = np.dtype(_DTYPES[code]).name if code in _DTYPES else "unknown"
        raise DataFormatError(
            f"{idx}: dtype code {code} ({name}): token ids need an integer dtype "
            "(codes 1-5 and 8); the index is damaged or not of token data"
        )
    need = _HEADER.size + 12 * seqs + 8 * docs
    if size < need:
        raise DataFormatError(
            f"{idx}: {size} bytes, but its header announces {seqs} sequences and {docs} "
            f"document boundaries, {need} bytes: the index is truncated (an interrupted "
            "copy?); copy it again"
        )
    return np.dtype(_DTYPES[code]), seqs, docs


def check_files(prefix: str) -> None:
    """The checks of :func:`open_dataset` that cost a few reads whatever the dataset's
    size, for every rank of a job before it starts: both files there, ``.bin`` not
    empty, the index header megatron-core's and as long as it announces, and the last
    sequence inside ``.bin`` (a data file cut short). The index's values are checked
    where the data is opened to be read.

    Raises:
        DataFormatError, DataMismatchError: as :func:`open_dataset`.
    """
    prefix = str(prefix)
    bin_bytes = _bin_bytes(prefix)
    with open(prefix + ".idx", "rb") as f:
        dtype, seqs, _ = _read_header(f, prefix + ".idx")
        if not seqs:
            return
        f.seek(_HEADER.size + 4 * (seqs - 1))
        (length,) = struct.unpack("<i", f.read(4))
        f.seek(_HEADER.size + 4 * seqs + 8 * (seqs - 1))
        (pointer,) = struct.unpack("<q", f.read(8))
    end = pointer + length * dtype.itemsize
    if end > bin_bytes:
        raise _past_end(prefix, end, bin_bytes, seqs - 1, seqs)


_KEY_WHOLE = 1 << 22  # index_key: an index up to this size is read whole,
_KEY_BLOCKS, _KEY_BLOCK = 256, 1 << 12  # a larger one in this many blocks of this size


def index_key(prefix: str) -> str:
    """A digest of the document layout of ``prefix``: its index (sequence lengths and
    pointers, document boundaries) and the size of its data file. For what is built
    from that layout and kept between runs, such as megatron-core's sample indices.

    The same contents give the same key on every rank, wherever the copy lies (no path,
    no time stamp). An index up to 4 MiB (about 350,000 sequences) is read whole; a
    larger one as 256 blocks of 4 KiB spread over it, with its header and its end, so
    the cost stays a few reads. The sequence pointers are running sums of the lengths:
    a changed length moves every pointer after it, so a rewritten dataset keeps its key
    only if its total size and every sampled block stay the same.
    """
    import hashlib

    prefix = str(prefix)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(_bin_bytes(prefix)).encode())
    with open(prefix + ".idx", "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(str(size).encode())
        if size <= _KEY_WHOLE:
            digest.update(f.read())
        else:
            last = size - _KEY_BLOCK
            for i in range(_KEY_BLOCKS + 1):
                f.seek(last * i // _KEY_BLOCKS)
                digest.update(f.read(_KEY_BLOCK))
    return digest.hexdigest()


def index_keys(prefixes: Iterable[str]) -> dict[str, str]:
    """:func:`index_key` of each of ``prefixes`` on a file system, in sorted order; a prefix
    on object storage has none (its index is read where its data is)."""
    from megatron_slkd.storage import is_object_url

    return {p: index_key(p) for p in sorted(prefixes) if not is_object_url(p)}


def _past_end(prefix: str, end: int, bin_bytes: int, seq: int, seqs: int) -> DataFormatError:
    return DataFormatError(
        f"{prefix}: the index points {end} bytes into {prefix}.bin, which has {bin_bytes} "
        f"(sequence {seq} of {seqs}); the two files are not one dataset (a truncated copy, "
        "or the .idx of another .bin?)"
    )


def open_dataset(prefix: str) -> IndexedData:
    """The IndexedDataset at ``prefix``, opened and checked (see :class:`IndexedData`)."""
    return IndexedData(prefix)


def iter_token_blocks(ds: IndexedData, doc_start: int, doc_end: int,
                      block_tokens: int = 1 << 22) -> Iterator[np.ndarray]:  # fmt: skip
    """Tokens of documents ``[doc_start, doc_end)`` in order, in blocks of about
    ``block_tokens``; each block is a numpy array in the dataset's dtype."""
    lengths = ds.sequence_lengths
    d = doc_start
    while d < doc_end:
        e, n = d, 0
        while e < doc_end and (n == 0 or n + int(lengths[e]) <= block_tokens):
            n += int(lengths[e])
            e += 1
        yield (
            ds.read(int(ds.sequence_pointers[d]), n)
            if _contiguous(ds, d, e)
            else np.concatenate([ds.get(i) for i in range(d, e)])
        )
        d = e


def _contiguous(ds: IndexedData, d: int, e: int) -> bool:
    ptr = ds.sequence_pointers
    size = ds.dtype.itemsize
    span = int(ptr[e - 1]) + int(ds.sequence_lengths[e - 1]) * size - int(ptr[d])
    return span == int(ds.sequence_lengths[d:e].sum()) * size


def dataset_fingerprint(prefix: str, ds: IndexedData | None = None) -> dict:
    """``prefix``, ``num_documents`` and ``num_tokens`` of a dataset, as a manifest records them."""
    ds = ds if ds is not None else open_dataset(prefix)
    lengths = ds.sequence_lengths
    return {
        "prefix": str(prefix),
        "num_documents": int(len(lengths)),
        "num_tokens": int(np.asarray(lengths, dtype=np.int64).sum()),
    }
