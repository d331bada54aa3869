"""Tier 1/3: remap-cache after a merge, a subset, a shuffle and a duplication, row by row.

Sources are two datasets with positional caches (each row a fixed function of its
absolute position in its own dataset); new datasets are written with
megatron-core's ``IndexedDatasetBuilder`` (``add_index`` is what Megatron-LM's
``tools/merge_datasets.py`` does). The expected row of every new document is
read from the source cache at the document the test put there: an oracle that
shares nothing with the remap's content matching.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import slkd, write_dataset, write_positional_cache
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_slkd.cache import open_cache
from megatron_slkd.data.remap import remap_cache
from megatron_slkd.data.verify import verify_cache
from megatron_slkd.errors import CacheCoverageError, CacheMismatchError

VOCAB = 1000


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("remap")
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("a", 25), ("b", 18)):
        docs = [rng.integers(0, VOCAB, int(k)) for k in rng.integers(1, 90, n)]
        prefix = write_dataset(root / name, docs)
        cache = write_positional_cache(root / f"{name}-cache", docs, VOCAB)
        out[name] = (prefix, cache, docs)
    return root, out


def _given(srcs):
    return {str(c): p for p, c, _ in srcs.values()}


def _write(prefix, docs):
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.as_tensor(np.asarray(d, dtype=np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _check_rows(out, picks, srcs):
    """Every row of ``out`` equals the source row of the document ``picks`` names."""
    new = open_cache(out)
    caches = {k: open_cache(v[1]) for k, v in srcs.items()}
    assert new.num_documents == len(picks)
    for j, pick in enumerate(picks):
        if pick is None:
            continue
        name, d = pick
        n = len(srcs[name][2][d])
        got, want = new.read(j, 0, n), caches[name].read(d, 0, n)
        assert np.array_equal(got.num_entries, want.num_entries), j
        k = want.ids.shape[1]
        assert np.array_equal(got.ids[:, :k], want.ids) and np.array_equal(
            got.weights[:, :k], want.weights
        ), j


@pytest.mark.parametrize("arrangement", ["merge", "subset", "shuffle", "duplicate"])
def test_remap_matches_the_source_rows(sources, tmp_path, arrangement):
    root, srcs = sources
    rng = np.random.default_rng(1)
    every = [("a", d) for d in range(25)] + [("b", d) for d in range(18)]
    if arrangement == "merge":  # merge_datasets.py: megatron-core add_index of each prefix
        builder = IndexedDatasetBuilder(str(tmp_path / "new.bin"), dtype=np.uint16)
        for name in ("a", "b"):
            builder.add_index(srcs[name][0])
        builder.finalize(str(tmp_path / "new.idx"))
        prefix, picks = str(tmp_path / "new"), every
    else:
        if arrangement == "subset":
            picks = every[::3]
        elif arrangement == "shuffle":
            picks = [every[i] for i in rng.permutation(len(every))]
        else:
            picks = every[:10] + every[5:15] + every[:3]
        prefix = _write(tmp_path / "new", [srcs[n][2][d] for n, d in picks])
    caches = [srcs["a"][1], srcs["b"][1]]
    r = remap_cache(caches, prefix, tmp_path / "out", source_prefixes=_given(srcs),
                    num_shards=3, progress=False)  # fmt: skip
    assert r["complete"] and r["missing_documents"] == []
    assert verify_cache(tmp_path / "out", prefix)["ok"]
    _check_rows(tmp_path / "out", picks, srcs)


def test_missing_documents_are_listed_or_get_empty_rows(sources, tmp_path):
    root, srcs = sources
    rng = np.random.default_rng(7)
    stranger = rng.integers(0, VOCAB, 40)
    docs = [srcs["a"][2][0], stranger, srcs["a"][2][3]]
    prefix = _write(tmp_path / "new", docs)
    with pytest.raises(CacheCoverageError, match=r"1 of 3 documents .*\(ids \[1\]\)"):
        remap_cache([srcs["a"][1]], prefix, tmp_path / "out", source_prefixes=_given(srcs),
                    progress=False)  # fmt: skip
    r = remap_cache([srcs["a"][1]], prefix, tmp_path / "out2", source_prefixes=_given(srcs),
                    allow_missing=True, progress=False)  # fmt: skip
    assert r["missing_documents"] == [1]
    assert verify_cache(tmp_path / "out2", prefix)["ok"]
    cache = open_cache(tmp_path / "out2")
    assert cache.manifest.extra["missing_documents"] == 1
    assert not cache.read(1, 0, 40).num_entries.any()
    _check_rows(tmp_path / "out2", [("a", 0), None, ("a", 3)], srcs)


def test_source_checked_against_its_dataset(sources, tmp_path):
    root, srcs = sources
    prefix = _write(tmp_path / "new", srcs["a"][2][:4])
    with pytest.raises(CacheMismatchError, match=r"--source-prefix .*=PREFIX"):
        remap_cache([srcs["a"][1]], prefix, tmp_path / "out", progress=False)  # "positional"
    wrong = {str(srcs["a"][1]): srcs["b"][0]}
    with pytest.raises(CacheMismatchError, match="is not the one it was built on"):
        remap_cache([srcs["a"][1]], prefix, tmp_path / "out", source_prefixes=wrong,
                    progress=False)  # fmt: skip


def test_remap_cli_resumes_and_under_mpirun(sources, tmp_path):
    root, srcs = sources
    every = [("b", d) for d in range(18)] + [("a", d) for d in range(25)]
    prefix = _write(tmp_path / "new", [srcs[n][2][d] for n, d in every])
    given = [f"{c}={p}" for c, p in _given(srcs).items()]
    args = ["remap-cache", srcs["a"][1], srcs["b"][1], "--data-prefix", prefix,
            "--source-prefix", *given, "--num-shards", "4", "--json"]  # fmt: skip
    r = slkd(*args, "--output", tmp_path / "one", "--no-progress")
    assert json.loads(r.stdout)["complete"]
    assert slkd("verify-cache", tmp_path / "one", "--data-prefix", prefix).returncode == 0
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent))
    if mpirun is None:
        pytest.skip("mpirun not found: pip install 'megatron-slkd[mpi]'")
    env = {**os.environ, "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo"}
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m",
           "megatron_slkd", *map(str, args), "--output", str(tmp_path / "mpi")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len([x for x in r.stdout.splitlines() if x.startswith("{")]) == 1  # rank 0 reports
    for i in range(4):
        name = f"shard-{i:05d}-of-00004.slkd"
        assert (tmp_path / "mpi" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    _check_rows(tmp_path / "mpi", every, srcs)


def _crc32_twin(doc: np.ndarray, vocab: int) -> np.ndarray:
    """Another document of ``doc``'s length and CRC-32 (of its tokens as little-endian int32),
    at most four tokens changed, every token still below ``vocab``: CRC-32 is affine over
    GF(2), so the bit flips whose CRC images cancel are a null vector of a 32 x 36 system."""
    import zlib

    base = np.asarray(doc, dtype="<i4")
    zero = zlib.crc32(np.zeros_like(base).tobytes())
    at = np.linspace(1, len(base) - 2, 4).astype(int)
    bits = [(int(p), b) for p in at for b in range(9)]  # 36 candidate flips, below 512
    assert vocab >= 512 and base[at].max() < 512
    images = []
    for p, b in bits:
        flip = np.zeros_like(base)
        flip[p] = 1 << b
        images.append(zlib.crc32(flip.tobytes()) ^ zero)
    # Gaussian elimination over GF(2), tracking which flips make each row.
    rows = [(img, 1 << i) for i, img in enumerate(images)]
    for bit in range(32):
        pivot = next((r for r in rows if r[0] >> bit & 1), None)
        if pivot is None:
            continue
        rows = [(r[0] ^ pivot[0], r[1] ^ pivot[1]) if r is not pivot and r[0] >> bit & 1
                else r for r in rows if r is not pivot]  # fmt: skip
    combo = next(m for img, m in rows if img == 0 and m)
    twin = base.copy()
    for i, (p, b) in enumerate(bits):
        if combo >> i & 1:
            twin[p] ^= 1 << b
    assert zlib.crc32(twin.tobytes()) == zlib.crc32(base.tobytes())
    assert not np.array_equal(twin, base) and twin.max() < vocab
    return twin.astype(np.int64)


def test_a_crc32_twin_is_no_match(tmp_path):
    # Document 3 of a 12-document dataset replaced by its CRC-32 twin: same length, same
    # CRC-32, other tokens. Matched by (length, CRC-32), the remap copied document 3's
    # rows from the source and recorded the twin's CRC, so verify and train passed it.
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 500, 64) for _ in range(12)]  # pre-chunked: one length
    src = write_dataset(tmp_path / "src", docs)
    cache = write_positional_cache(tmp_path / "src-cache", docs, VOCAB)
    twin = [*docs[:3], _crc32_twin(docs[3], VOCAB), *docs[4:]]
    new = _write(tmp_path / "new", twin)
    given = {str(cache): src}
    with pytest.raises(CacheCoverageError, match=r"1 of 12 documents .*\(ids \[3\]\)"):
        remap_cache([cache], new, tmp_path / "out", source_prefixes=given, progress=False)
    r = remap_cache([cache], new, tmp_path / "out2", source_prefixes=given, allow_missing=True,
                    progress=False)  # fmt: skip
    assert r["missing_documents"] == [3]
    assert verify_cache(tmp_path / "out2", new)["ok"]
    assert not open_cache(tmp_path / "out2").read(3, 0, 64).num_entries.any()
    # The source cache against the twin dataset: same lengths and CRC-32, refused.
    found = verify_cache(cache, new)
    assert not found["ok"] and "token identity of documents 0..11 differs" in found["problems"][0]
