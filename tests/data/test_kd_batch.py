"""Tier 2: collate, TP broadcast, PP routing and CP splitting of sparse targets on gloo."""

import pytest
import torch

from megatron_slkd.data.batch import collate_kd, get_kd_batch
from megatron_slkd.testing import run_distributed

S, B = 8, 3


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in (2, 5, 3):  # samples with different K: collate pads to 5
        w = torch.rand(S, k, generator=g)
        w /= w.sum(-1, keepdim=True)
        w[3] = 0  # a position without targets
        out.append(
            {
                "tokens": torch.randint(0, 100, (S,), generator=g),
                "labels": torch.randint(0, 100, (S,), generator=g),
                "loss_mask": torch.ones(S),
                "position_ids": torch.arange(S),
                "attention_mask": torch.ones(1, S, S, dtype=torch.bool).tril().logical_not(),
                "kd_ids": torch.randint(0, 49152, (S, k), generator=g),
                "kd_weights": w,
            }
        )
    return out


def test_collate_pads_k():
    batch = collate_kd(_samples())
    assert batch["kd_ids"].shape == (B, S, 5) and batch["kd_weights"].shape == (B, S, 5)
    assert torch.all(batch["kd_weights"][0, :, 2:] == 0)
    assert torch.allclose(batch["kd_weights"][1].sum(-1)[[0, 1, 2, 4]], torch.ones(4))


def _routing(rank, world, tp, pp, cp):
    from megatron.core import parallel_state as ps

    expected = collate_kd(_samples())
    it = iter([collate_kd(_samples())]) if ps.get_tensor_model_parallel_rank() == 0 else None
    got = get_kd_batch(it)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not (first or last):
        assert got is None
        return
    assert ("tokens" in got) == first and ("kd_ids" in got) == last
    cp_rank = ps.get_context_parallel_rank()
    chunk = S // (2 * cp)
    keep = torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk) for c in (cp_rank, 2 * cp - cp_rank - 1)]
    )
    # Both ends attend by the mask (a document-isolating one must reach every layer);
    # megatron-core's CP split cuts its query rows like the tokens.
    assert torch.equal(got["attention_mask"], expected["attention_mask"][:, :, keep])
    if first:
        assert torch.equal(got["tokens"], expected["tokens"][:, keep])
    if last:
        assert got["kd_ids"].dtype == torch.int64
        assert torch.equal(got["kd_ids"], expected["kd_ids"][:, keep])
        assert torch.equal(got["labels"], expected["labels"][:, keep])
        w = expected["kd_weights"][:, keep]
        assert torch.allclose(got["kd_weights"], w, atol=1e-3)  # float16 on the wire
        sums = got["kd_weights"].sum(-1)
        assert torch.allclose(sums[w.sum(-1) > 0], torch.ones(()), atol=1e-6)
        assert torch.all(sums[w.sum(-1) == 0] == 0)


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2), (1, 2)])
def test_tp_broadcast_and_pp_routing(tp, pp):
    run_distributed(_routing, 4, tp, pp, 1, tp=tp, pp=pp, megatron=True)


def _dataset_samples(rank, world, path):
    from megatron.core import parallel_state as ps

    samples = torch.load(path)
    expected = collate_kd(samples)
    tp0 = ps.get_tensor_model_parallel_rank() == 0
    got = get_kd_batch(iter([collate_kd(samples)]) if tp0 else None)
    if ps.is_pipeline_last_stage():
        assert torch.equal(got["kd_ids"], expected["kd_ids"])
        assert torch.allclose(got["kd_weights"], expected["kd_weights"], atol=1e-3)
        assert torch.equal(got["labels"], expected["labels"])


def test_last_stage_receives_the_targets_the_dataset_produced(tmp_path):
    """Samples of a real SparseKDGPTDataset through TP=2 x PP=2."""
    import numpy as np
    from helpers import write_dataset, write_positional_cache
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_slkd.data.kd_dataset import SparseKDGPTDataset, SparseKDGPTDatasetConfig

    class Tok:
        vocab_size, eod, pad, unique_identifiers = 65536, 65535, 65534, {"class": "t"}

    lengths = np.random.default_rng(1).integers(1, 50, size=30)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    docs = [1 + np.arange(starts[i], starts[i + 1]) for i in range(30)]
    prefix = write_dataset(tmp_path / "d", docs)
    cache = write_positional_cache(tmp_path / "c", docs, 65536)
    cfg = SparseKDGPTDatasetConfig(
        random_seed=3, sequence_length=S, blend=([prefix], None), split="100,0,0",
        path_to_cache=str(tmp_path / "idx"), tokenizer=Tok(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, kd_caches={prefix: str(cache)},
    )  # fmt: skip
    train = BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [6, 0, 0], lambda: True, cfg).build()[
        0
    ]
    samples = [train[i] for i in range(B)]
    assert any(s["kd_weights"].any() for s in samples)
    torch.save(samples, tmp_path / "samples.pt")
    run_distributed(_dataset_samples, 4, str(tmp_path / "samples.pt"), tp=2, pp=2, megatron=True)


def test_context_parallel_split_matches_the_tokens():
    run_distributed(_routing, 2, 1, 1, 2, tp=1, pp=1, cp=2, megatron=True)
