"""The training config: YAML with flag overrides, typed, validated, documented."""

import argparse
from pathlib import Path

import pytest
import yaml

from megatron_slkd.errors import ConfigError
from megatron_slkd.training.config import (
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_to_dict,
    field_docs,
    load_config,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_flags_override_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {num_layers: 6, hidden_size: 96}\nkd: {alpha: 0.25}\n")
    cfg = _parse("--config", str(f), "--model-num-layers", "8", "--kd-caches", "a=b", "c=d",
                 "--no-log-tensorboard", "--data-path", "x")  # fmt: skip
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 96
    assert cfg.kd.alpha == 0.25 and cfg.kd.caches == {"a": "b", "c": "d"}
    assert cfg.log.tensorboard is False and cfg.data.path == ["x"]
    again = load_config(None, {f"{s}.{k}": v for s, sec in config_to_dict(cfg).items()
                               for k, v in sec.items()})  # fmt: skip
    assert again == cfg


def test_a_prefix_holding_equals_signs_keys_its_cache_and_meta():
    # Hive-style directories (lang=en) are common in data lakes; a flag splits at its first
    # "=" only where that gives no prefix of the run.
    cfg = _parse("--data-path", "0.5", "d/lang=en/c", "0.5", "d/plain", "--kd-caches",
                 "d/lang=en/c=s3://b/seed=1", "d/plain=k/v=2", "--data-meta",
                 "d/lang=en/c=m.json")  # fmt: skip
    cfg.validate()
    assert cfg.kd.caches == {"d/lang=en/c": "s3://b/seed=1", "d/plain": "k/v=2"}
    assert cfg.data.meta == {"d/lang=en/c": "m.json"}
    cfg.validate()  # idempotent (a resumed run validates the saved config again)
    assert cfg.kd.caches == {"d/lang=en/c": "s3://b/seed=1", "d/plain": "k/v=2"}


def test_a_cache_keyed_by_another_spelling_of_its_prefix():
    # --data-path data/corpus with --kd-caches ./data/corpus=cache (or the absolute path)
    # was refused as "data prefix ['data/corpus'] has no sparse-logit cache".
    import os

    cfg = _parse("--data-path", "1", "data/corpus", "1", "/abs/other/", "--kd-caches",
                 "./data/corpus=c1", f"{os.getcwd()}/data/corpus/../corpus2=c3",
                 "/abs//other=c2", "--data-meta", os.path.abspath("data/corpus") + "=m.json")
    cfg.validate()
    assert cfg.kd.caches == {"data/corpus": "c1", "/abs/other/": "c2",
                             f"{os.getcwd()}/data/corpus/../corpus2": "c3"}  # no such prefix
    assert cfg.data.meta == {"data/corpus": "m.json"}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: {num_layerz: 3}", "unknown model field(s) ['num_layerz']"),
        ("trainer: {}", "unknown section(s) ['trainer']"),
        ("model: {num_layers: three}", "model.num_layers"),
        ("kd: {ce_only: maybe}", "kd.ce_only"),
        ("- 1\n- 2", "expected a mapping"),
    ],
)
def test_bad_yaml_is_refused(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_every_field_is_documented_and_has_a_flag():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    helptext = p.format_help()
    for section, value in vars(TrainConfig()).items():
        docs = field_docs(type(value))
        for name in vars(value):
            assert docs.get(name), f"{section}.{name} has no docstring"
            assert f"--{section}-{name}".replace("_", "-") in helptext


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_validate(path):
    cfg = load_config(path, {"data.path": ["data/corpus"]})
    cfg.validate()
    assert yaml.safe_load(path.read_text())["model"]["num_layers"] == cfg.model.num_layers


@pytest.mark.parametrize(
    "name, value, needle",
    [
        ("train.micro_batch_size", 0, "train.micro_batch_size=0 must be at least 1 "
                                      "(--train-micro-batch-size)"),
        ("model.seq_length", 0, "model.seq_length=0 must be at least 1"),
        ("optim.lr", -1.0, "optim.lr=-1.0 must be at least 0"),
        ("optim.adam_eps", 0.0, "optim.adam_eps=0.0 must be above 0"),
        ("optim.lr", float("nan"), "optim.lr=nan must be at least 0"),
        ("log.interval", 0, "log.interval=0 must be at least 1"),
        ("model.hidden_dropout", 1.0, "model.hidden_dropout=1.0 must be below 1"),
        ("optim.adam_beta2", 1.0, "adam_beta2 must be below 1"),
        ("optim.min_lr", 0.01, "optim.min_lr=0.01 is above optim.lr=0.003"),
        ("data.seed", -1, "data.seed=-1 must be at least 0"),
        ("data.seed", 2**32, "data.seed=4294967296 must be below 2**32"),
    ],
)
def test_values_out_of_range_are_refused_by_name(name, value, needle):
    # They used to reach megatron-core: a ZeroDivisionError in the schedule for a
    # micro-batch of 0, an AssertionError in the scheduler for min_lr above lr.
    cfg = load_config(None, {"data.path": ["data/corpus"], name: value})
    with pytest.raises(ConfigError, match=None) as e:
        cfg.validate()
    assert needle in str(e.value), str(e.value)


def test_min_lr_follows_lr_unless_given():
    # It was a fixed 3e-4, so --optim-lr 1e-4 alone was refused as min_lr above lr.
    cfg = load_config(None, {"data.path": ["data/corpus"], "optim.lr": 1e-4})
    cfg.validate()
    assert cfg.optim.min_lr == pytest.approx(1e-5)
    cfg = load_config(None, {"data.path": ["data/corpus"], "optim.lr": 1e-4, "optim.min_lr": 0.0})
    cfg.validate()
    assert cfg.optim.min_lr == 0.0


def test_the_range_table_names_real_fields():
    cfg = TrainConfig()
    for name in TrainConfig._AT_LEAST:
        section, field = name.split(".")
        assert hasattr(getattr(cfg, section), field), name
    load_config(None, {"data.path": ["data/corpus"]}).validate()  # the defaults pass
