"""`first_reordered` finds where two builds of one dataset (other sample counts) part.

The corpus encodes positions in its tokens (token = base + absolute position in its
prefix), so a sample's tokens name the span it was cut from: the oracle compares the
samples megatron-core's builder returns, token for token, and shares no index arithmetic
with the function under test.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch.distributed as dist
from helpers import write_dataset
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_slkd.testing import free_port
from megatron_slkd.training.data import _moved, first_reordered

SEQ = 32


class _Tokenizer:
    vocab_size = 65536
    eod = 65535
    pad = 65534
    unique_identifiers = {"class": "positional"}


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    if not dist.is_initialized():  # megatron-core's BlendedDataset asks for the rank
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    root = tmp_path_factory.mktemp("order")
    rng = np.random.default_rng(1)
    out = []
    for name, base, docs in (("a", 1, 60), ("b", 30001, 60), ("c", 50001, 8)):
        lengths = rng.integers(1, 40, size=docs)  # short: many samples span 3+ documents
        starts = np.concatenate([[0], np.cumsum(lengths)])
        out.append(write_dataset(root / name,
                                 [base + np.arange(starts[i], starts[i + 1])
                                  for i in range(len(lengths))]))  # fmt: skip
    return root, out


def _build(root, blend, samples):
    config = GPTDatasetConfig(
        random_seed=3, sequence_length=SEQ, blend=blend, split="100,0,0",
        path_to_cache=str(root / "index-cache"), tokenizer=_Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        mid_level_dataset_surplus=0.005,
    )  # fmt: skip
    return BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True,
                                         config).build()[0]  # fmt: skip


def _oracle(old, new, n):
    for i in range(n):
        if not np.array_equal(old[i]["tokens"].numpy(), new[i]["tokens"].numpy()):
            return i
    return None


# One prefix has about 1150 tokens, 35 samples of 32 an epoch: 10 and 30 samples are
# one epoch, 40 two (its last separate: under 80% of an epoch), 100 three.
@pytest.mark.parametrize("counts", [(10, 30), (30, 10), (10, 40), (40, 100), (30, 100)])
@pytest.mark.parametrize("blended", [False, True], ids=["one-prefix", "blend"])
def test_first_reordered_matches_the_tokens(prefixes, counts, blended):
    root, (a, b, _) = prefixes
    blend = ([a, b], [0.7, 0.3]) if blended else ([a], None)
    old, new = (_build(root, blend, n) for n in counts)
    n = min(counts)
    expected = _oracle(old, new, n)
    assert first_reordered(old, new, n, chunk=7) == expected
    assert first_reordered(old, old, n) is None
    idx = np.arange(n)  # the sample-by-sample scan, which equal index arrays skip
    assert list(np.flatnonzero(_moved(old, new, idx, idx)))[:1] == ([] if expected is None
                                                                   else [expected])  # fmt: skip
    if counts in ((10, 30), (30, 10)) and not blended:
        assert expected is None  # the same epoch: the same order
    if counts == (10, 40) and not blended:
        assert expected is not None  # another epoch count reshuffles from the start
    if counts == (30, 100) and blended:
        assert expected is not None  # a part's epoch count changed


def _gpt(documents, starts):
    """A stand-in GPTDataset whose sample i spans documents[starts[i][0]..starts[i+1][0]]."""
    return SimpleNamespace(
        shuffle_index=np.arange(len(starts) - 1),
        sample_index=np.asarray(starts),
        document_index=np.asarray(documents),
    )


def test_a_sample_with_other_documents_between_the_same_ends_is_another():
    rows = [[0, 0], [3, 5], [4, 2]]  # sample 0 spans 4 documents, sample 1 two
    same = _gpt([7, 8, 9, 10, 11], rows)
    middle = _gpt([7, 9, 8, 10, 11], rows)  # the same first and last, others between
    assert first_reordered(same, same, 2) is None
    assert first_reordered(same, middle, 2) == 0
    later = _gpt([7, 8, 9, 10, 12], rows)  # only sample 1's last document differs
    assert first_reordered(same, later, 2) == 1


def test_a_blend_parts_where_one_part_is_reshuffled(prefixes):
    # A small part ("c", a few samples an epoch) runs into a second epoch while the large
    # one stays in its first: the blend keeps its first samples and parts at c's first.
    root, (a, _, c) = prefixes
    old, new = (_build(root, ([a, c], [0.8, 0.2]), n) for n in (10, 30))
    moved = first_reordered(old, new, 10)
    assert moved is not None and moved > 0
    assert moved == _oracle(old, new, 10)
