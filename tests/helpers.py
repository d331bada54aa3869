"""Test helpers: small synthetic caches and datasets with known contents."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_slkd.cache import Manifest, ShardWriter, encoding_for
from megatron_slkd.cache.manifest import MANIFEST_NAME
from megatron_slkd.cache.writer import write_sidecar
from megatron_slkd.sampling import sample_sparse_targets
from megatron_slkd.testing import same_rows_fraction  # noqa: F401 - the tests' name for it


@dataclasses.dataclass
class SyntheticCache:
    path: Path
    docs: list[np.ndarray]
    targets: list  # SparseTargets per document (rows for every token)
    manifest: Manifest

    def expected_rows(self, doc: int):
        """Ids, weights and entry counts the cache must return for ``doc``."""
        t = self.targets[doc]
        n = t.num_valid.numpy().copy()
        n[-1] = 0
        return t.ids.numpy(), t.weights.numpy(), n


def write_synthetic_cache(
    path: Path,
    lengths,
    *,
    vocab: int = 300,
    method: str = "rs",
    num_samples: int = 50,
    k: int = 8,
    num_shards: int = 2,
    chunk_tokens: int = 64,
    seed: int = 5,
    write_manifest: bool = True,
    sidecars: bool = False,
) -> SyntheticCache:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (int(n),), generator=g).numpy() for n in lengths]
    enc = encoding_for(method, vocab, num_samples=num_samples, k=k)
    bounds = np.linspace(0, len(docs), num_shards + 1).astype(int)
    targets, records, pos = [], [], 0
    for i in range(num_shards):
        w = ShardWriter.open(
            path / f"shard-{i:05d}.slkd",
            encoding=enc,
            vocab_size=vocab,
            doc_start=int(bounds[i]),
            doc_end=int(bounds[i + 1]),
            chunk_tokens=chunk_tokens,
        )
        for d in range(bounds[i], bounds[i + 1]):
            n = len(docs[d])
            logits = torch.randn(n, vocab, generator=g) * 3
            t = sample_sparse_targets(
                logits,
                method=method,
                seed=seed,
                positions=torch.arange(pos, pos + n),
                num_samples=num_samples,
                k=k,
            )
            w.add_document(
                docs[d],
                t.ids.numpy(),
                t.weights.numpy(),
                t.num_valid.numpy(),
                None if t.counts is None else t.counts.numpy(),
            )
            targets.append(t)
            pos += n
        records.append(w.finalize())
    manifest = Manifest(
        dataset=dict(prefix="synthetic", num_documents=len(docs), num_tokens=int(sum(lengths))),
        tokenizer=dict(fingerprint="synthetic", vocab_size=vocab),
        teacher=dict(name="random logits"),
        sampling=dict(
            method=method,
            num_samples=num_samples if method == "rs" else None,
            k=k if method == "topk" else None,
            temperature=1.0,
            seed=seed,
        ),
        encoding=enc,
        shards=records,
    )
    if write_manifest:
        (path / MANIFEST_NAME).write_text(manifest.to_json())
    if sidecars:
        for rec in records:
            write_sidecar(path / rec["file"], manifest, rec)
    return SyntheticCache(path, docs, targets, manifest)


def write_dataset(prefix: Path, docs) -> str:
    """A megatron-core IndexedDataset holding ``docs`` (one sequence each)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.as_tensor(np.asarray(d, dtype=np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def write_positional_cache(path: Path, docs, vocab: int, num_samples: int = 10) -> Path:
    """A one-shard RS cache whose row at absolute position p is a fixed function of p
    (1 to 4 ids, counts summing to ``num_samples``), with its manifest."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    enc = encoding_for("rs", vocab, num_samples=num_samples)
    w = ShardWriter.open(path / "shard-00000.slkd", encoding=enc, vocab_size=vocab, doc_start=0,
                         doc_end=len(docs), chunk_tokens=64)  # fmt: skip
    pos = 0
    for doc in docs:
        n = len(doc)
        p = np.arange(pos, pos + n)
        k = 1 + p % 4
        ids = (p[:, None] * 31 + np.arange(4)[None, :] * 7) % vocab
        counts = np.zeros((n, 4), np.int64)
        for j in range(4):
            counts[:, j] = np.where(j < k, num_samples // k + (j < num_samples % k), 0)
        w.add_document(doc, ids, counts / num_samples, k, counts)
        pos += n
    rec = w.finalize()
    manifest = Manifest(
        dataset=dict(prefix="positional", num_documents=len(docs), num_tokens=pos),
        tokenizer=dict(fingerprint="positional", vocab_size=vocab), teacher={},
        sampling=dict(method="rs", num_samples=num_samples), encoding=enc, shards=[rec],
    )  # fmt: skip
    (path / MANIFEST_NAME).write_text(manifest.to_json())
    return path


SLKD = [sys.executable, "-m", "megatron_slkd"]


def slkd(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the ``slkd`` CLI in a subprocess (output captured, text mode)."""
    r = subprocess.run([*SLKD, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


HEAVY_MODULES = ("torch", "megatron.core", "transformers")


def slkd_imports(*args, timeout: float = 300) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``slkd ARGS`` in a fresh interpreter; returns the finished process (its stdout
    without the last line) and which of :data:`HEAVY_MODULES` it imported by its end."""
    code = (
        "import json, sys\n"
        "from megatron_slkd.cli import main\n"
        "try:\n"
        f"    status = main({list(map(str, args))!r})\n"
        "except SystemExit as e:\n"
        "    status = e.code\n"
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
        "sys.exit(status)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    *out, last = r.stdout.rstrip("\n").split("\n")
    r.stdout = "\n".join(out)
    return r, set(json.loads(last))


def torchrun_slkd(nproc: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``slkd`` under torchrun with ``nproc`` local processes; asserts success unless
    ``check`` is false."""
    import os
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = subprocess.run([torchrun, "--nproc-per-node", str(nproc), "-m", "megatron_slkd",
                        *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)  # fmt: skip
    assert r.returncode == 0 or not check, r.stderr[-3000:]
    return r


def prepare_hf_dataset(prefix, tokenizer, documents: int) -> str:
    """``documents`` built-in documents tokenized by a Hugging Face tokenizer (SmolLM2's
    vocabulary), each ended by <|endoftext|>."""
    slkd("prepare-data", "--builtin-corpus", "stdlib-docstrings", "--max-documents", documents,
         "--hf-tokenizer", tokenizer, "--eod-token", "<|endoftext|>", "--output-prefix", prefix,
         "--no-progress")  # fmt: skip
    return str(prefix)


def next_token_hit_rate(cache_dir, prefix: str) -> float:
    """Fraction of positions whose actual next token is among the cached ids.

    A teacher reading its own document prefix predicts the real next token
    among its draws most of the time; rows shifted by one position would not.
    """
    from megatron_slkd.cache import open_cache
    from megatron_slkd.data import open_dataset

    cache, ds = open_cache(cache_dir), open_dataset(prefix)
    hits = total = 0
    for d in range(len(ds)):
        tokens = ds.get(d)
        rows = cache.read(d, 0, len(tokens))
        assert rows.num_entries[-1] == 0
        for p in range(len(tokens) - 1):
            hits += int(tokens[p + 1] in rows.ids[p, : rows.num_entries[p]])
            total += 1
    return hits / total


def write_markov_corpus(
    root: Path,
    *,
    vocab: int = 128,
    num_docs: int = 120,
    seed: int = 0,
    num_samples: int = 50,
    fingerprint: str = "markov",
) -> tuple[str, Path]:
    """A dataset drawn from a fixed random Markov chain, its ``meta.json`` record, and an
    RS cache whose teacher is that chain (so a student can learn the teacher's targets).

    Returns (data prefix, cache directory). Token ``vocab - 1`` is the end of document.
    """
    import json

    from megatron_slkd.data.prepare import META_SUFFIX

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 2.5
    probs = torch.softmax(logits, -1)
    docs = []
    for _ in range(num_docs):
        n = int(torch.randint(40, 200, (1,), generator=g))
        toks = [int(torch.randint(0, vocab - 1, (1,), generator=g))]
        for _ in range(n - 1):
            toks.append(int(torch.multinomial(probs[toks[-1]], 1, generator=g)))
        docs.append(np.array(toks[:-1] + [vocab - 1]))
    prefix = write_dataset(root / "markov", docs)
    Path(prefix + META_SUFFIX).write_text(json.dumps(
        {"tokenizer": {"fingerprint": fingerprint, "vocab_size": vocab, "eod": vocab - 1}}
    ))  # fmt: skip
    cache = root / "markov-cache"
    cache.mkdir(exist_ok=True)
    enc = encoding_for("rs", vocab, num_samples=num_samples)
    w = ShardWriter.open(cache / "shard-00000.slkd", encoding=enc, vocab_size=vocab, doc_start=0,
                         doc_end=len(docs), chunk_tokens=256)  # fmt: skip
    pos = 0
    for doc in docs:
        n = len(doc)
        t = sample_sparse_targets(
            logits[torch.as_tensor(doc)],
            method="rs",
            seed=seed,
            positions=torch.arange(pos, pos + n),
            num_samples=num_samples,
        )
        w.add_document(doc, t.ids.numpy(), t.weights.numpy(), t.num_valid.numpy(), t.counts.numpy())
        pos += n
    rec = w.finalize()
    manifest = Manifest(
        dataset=dict(prefix=prefix, num_documents=len(docs), num_tokens=pos),
        tokenizer=dict(fingerprint=fingerprint, vocab_size=vocab), teacher=dict(name="markov"),
        sampling=dict(method="rs", num_samples=num_samples, k=None, temperature=1.0, seed=seed),
        encoding=enc, shards=[rec],
    )  # fmt: skip
    (cache / MANIFEST_NAME).write_text(manifest.to_json())
    return prefix, cache


def as_format_version_1(cache_dir: Path) -> None:
    """Rewrite a cache in place as format version 1 wrote it: shard headers of version 1
    with no 128-bit token identity (bytes 88..123 zero), records without ``token_xxh128``,
    manifest and sidecars of ``format_version`` 1 (the layout is otherwise the same)."""
    import json
    import struct
    import zlib

    from megatron_slkd.records import dump_record

    cache_dir = Path(cache_dir)
    for shard in cache_dir.glob("*.slkd"):
        with open(shard, "r+b") as f:
            head = bytearray(f.read(128))
            head[8:12] = struct.pack("<I", 1)
            head[88:124] = bytes(36)
            head[124:128] = struct.pack("<I", zlib.crc32(bytes(head[:124])))
            f.seek(0)
            f.write(head)
    for record in [cache_dir / "manifest.json", *cache_dir.glob("*.slkd.json")]:
        if not record.exists():
            continue
        d = json.loads(record.read_text())
        d.pop("checksum", None)
        d["format_version"] = 1
        for s in d["shards"]:
            s.pop("token_xxh128", None)
            s["file_crc32"] = zlib.crc32((cache_dir / s["file"]).read_bytes())
        record.write_text(dump_record(d))


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
"""A Megatron-LM source tree of the installed megatron-core's release (``.ci/megatron_lm.sh``
prepares one from ``../shared/megatron-lm/``); the tests that run inside Megatron-LM skip
without it, except under ``SLKD_REQUIRE_MEGATRON_LM=1`` (CI), where the session refuses to
start (tests/conftest.py)."""

needs_megatron_lm = pytest.mark.skipif(
    not MEGATRON_LM_DIR,
    reason="set MEGATRON_LM_DIR to a Megatron-LM tree of the installed release to run "
    "(eval \"$(bash .ci/megatron_lm.sh .venv/bin/python DIR)\" prepares one)",
)


def megatron_lm_defines(flag: str) -> bool:
    """Whether the Megatron-LM tree's argument parser has ``flag`` (e.g. ``--logits-load-dir``
    from core_r0.19.0 on, ``--legacy-tokenizer`` up to core_r0.16.0)."""
    arguments = Path(MEGATRON_LM_DIR or ".") / "megatron" / "training" / "arguments.py"
    return arguments.is_file() and f"'{flag}'" in arguments.read_text()


def megatron_lm_env() -> dict[str, str]:
    """The environment of a process that runs inside the Megatron-LM tree: the tree's
    ``megatron`` first on the path, then ``MEGATRON_LM_EXTRA_PATH`` (six, pydantic, triton
    where the venv lacks them), and a port of its own (test files run side by side)."""
    from megatron_slkd.launch import free_port

    extra = os.environ.get("MEGATRON_LM_EXTRA_PATH")
    path = os.pathsep.join(filter(None, [MEGATRON_LM_DIR, extra]))
    return dict(os.environ, PYTHONPATH=path, MASTER_PORT=str(free_port()))
