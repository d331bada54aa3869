"""Tier 2: `slkd train`'s document settings reach megatron-core's dataset and the student.

A packed sample holds the end of one document and the start of the next. With
``data.reset_attention_mask`` the student's logits over the second document must be
those it gives that document alone (the teacher's view: the cache is built on each
document's own prefix), and without it they must not be; with ``data.eod_mask_loss``
the position whose input is the end-of-document id has no loss. The Transformer
Engine spec, whose causal attention ignores the mask, is refused with the setting.
"""

import numpy as np
import pytest
import torch

from megatron_slkd.errors import ConfigError
from megatron_slkd.testing import run_distributed
from megatron_slkd.training.config import load_config

VOCAB = 500  # NullTokenizer: ids below it, the end-of-document id is VOCAB itself


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from helpers import write_dataset

    from megatron_slkd.data.describe import describe_data
    from megatron_slkd.data.tokenizers import NullTokenizer

    root = tmp_path_factory.mktemp("documents")
    rng = np.random.default_rng(0)
    docs = [[*rng.integers(0, VOCAB, int(n)).tolist(), VOCAB] for n in rng.integers(9, 30, 40)]
    prefix = write_dataset(root / "corpus", docs)
    describe_data(prefix, NullTokenizer(VOCAB), progress=False, text_check=False)
    return prefix


def _config(prefix, run_dir, **overrides):
    values = {
        "data.path": [prefix],
        "data.split": "100,0,0",
        "data.num_workers": 0,
        "kd.ce_only": True,
        "model.num_layers": 2,
        "model.hidden_size": 32,
        "model.ffn_hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.seq_length": 48,
        "model.transformer_impl": "local",
        "model.init_method_std": 0.5,  # logits of a few units, so a difference shows
        "train.micro_batch_size": 1,
        "train.global_batch_size": 1,
        "train.steps": 4,
        "checkpoint.dir": str(run_dir),
    }
    values.update(overrides)
    return load_config(None, values)


def _second_document(rank, world, cfg, isolated):
    from megatron_slkd.training.data import build_datasets, read_tokenizer
    from megatron_slkd.training.model import build_model

    tokenizer = read_tokenizer(cfg)
    train, _ = build_datasets(cfg, tokenizer, 4, 0, with_cache=False)
    model = build_model(cfg, tokenizer.vocab_size, "cpu", torch.float32)[0]
    model.eval()
    sample = train[0]
    tokens = torch.as_tensor(sample["tokens"])
    ends = (tokens == VOCAB).nonzero().flatten().tolist()
    e = ends[0]  # the first document to end inside the sample; the next starts at e + 1
    assert 0 < e < len(tokens) - 8, ends
    loss_mask = torch.as_tensor(sample["loss_mask"])
    assert loss_mask[e] == (0.0 if cfg.data.eod_mask_loss else 1.0)
    with torch.no_grad():
        packed = model(tokens[None], torch.as_tensor(sample["position_ids"])[None],
                       torch.as_tensor(sample["attention_mask"])[None])  # fmt: skip
        alone = tokens[e + 1 : ends[1] + 1 if len(ends) > 1 else None]
        n = len(alone)
        causal = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)  # True: masked out
        own = model(alone[None], torch.arange(n)[None], causal[None][0])
    gap = (packed[0, e + 1 : e + 1 + n] - own[0]).abs().max().item()
    scale = own.abs().max().item()  # float32 sums in another order: relative agreement
    if isolated:
        assert gap < 3e-5 * scale, (gap, scale)
    else:  # the check can fail: the previous document's tokens change these logits
        assert gap > 1e-2 * scale, (gap, scale)


@pytest.mark.parametrize("isolated", [True, False], ids=["reset", "packed"])
def test_reset_attention_mask_gives_each_document_its_own_context(corpus, tmp_path, isolated):
    cfg = _config(corpus, tmp_path / "run", **{"data.reset_attention_mask": isolated,
                                               "data.eod_mask_loss": isolated})  # fmt: skip
    run_distributed(_second_document, 1, cfg, isolated, megatron=True)


def test_reset_attention_mask_is_refused_with_transformer_engine(corpus, tmp_path):
    from megatron_slkd.training.model import layer_spec

    te = {"data.reset_attention_mask": True, "model.transformer_impl": "transformer_engine"}
    cfg = _config(corpus, tmp_path / "run", **te)
    with pytest.raises(ConfigError, match="reset_attention_mask needs the local layer spec"):
        layer_spec(cfg.model, "cuda", document_mask=cfg.data.reset_attention_mask)


def test_reset_attention_mask_is_refused_past_two_pipeline_stages(corpus, tmp_path):
    # Middle stages read no batch: their layers would attend across documents.
    with pytest.raises(ConfigError, match="middle pipeline stages read no batch"):
        _config(corpus, tmp_path / "run", **{"data.reset_attention_mask": True,
                                             "parallel.pipeline": 4,
                                             "model.num_layers": 4}).validate()  # fmt: skip
    _config(corpus, tmp_path / "run", **{"parallel.pipeline": 4,
                                         "model.num_layers": 4}).validate()  # without: fine
