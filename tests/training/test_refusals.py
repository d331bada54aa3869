"""Bad input to `slkd train` is refused before the first step, saying what to change."""

import json
import shutil

import numpy as np
import pytest
from helpers import slkd, slkd_imports, write_dataset

from megatron_slkd.data.indexed import index_key
from megatron_slkd.records import dump_record


def _base(prefix, run_dir, *extra):
    return [
        "train", "--data-path", prefix, "--data-split", "90,10,0",
        "--data-index-cache", str(run_dir.parent / "index-cache"), "--data-num-workers", "0",
        "--model-num-layers", "2", "--model-hidden-size", "64", "--model-ffn-hidden-size", "128",
        "--model-seq-length", "64", "--train-steps", "1", "--train-global-batch-size", "2",
        "--eval-batches", "1", "--checkpoint-dir", str(run_dir), *extra,
    ]  # fmt: skip


def _refused(args, *needles, before_first_step=True, before_megatron=False):
    """The last line of stderr of ``slkd ARGS`` refused; ``before_megatron``: a refusal a
    few reads decide comes before megatron-core is imported (seconds of start-up)."""
    r, imported = slkd_imports(*args)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    if before_megatron:
        assert "megatron.core" not in imported, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("slkd train: error:"), r.stderr[-3000:]
    for n in needles:
        assert n in last, last
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if before_first_step:
        assert "step 1/" not in r.stdout
    return last


def test_prefix_without_cache(markov, tmp_path):
    prefix, cache = markov
    _refused(_base(prefix, tmp_path / "a"), "--kd-caches", "--kd-ce-only", before_megatron=True)
    _refused(_base(prefix, tmp_path / "b", "--kd-caches", f"{prefix}-other={cache}"),
             prefix, "no sparse-logit cache", "slkd build-cache", before_megatron=True)  # fmt: skip
    _refused(_base(prefix, tmp_path / "c", "--kd-caches", f"{prefix}={tmp_path / 'typo'}"),
             "typo: no such cache directory", prefix, before_megatron=True)  # fmt: skip
    _refused(_base(prefix, tmp_path / "d", "--kd-caches", f"{prefix}={tmp_path}"),
             "manifest.json: no manifest", before_megatron=True)  # fmt: skip


def test_cache_of_another_tokenizer(markov, tmp_path):
    prefix, cache = markov
    other = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, other + ext)
    meta = json.loads(open(prefix + ".meta.json").read())
    meta["tokenizer"]["fingerprint"] = "another-tokenizer"
    open(other + ".meta.json", "w").write(dump_record(meta))
    _refused(_base(other, tmp_path / "r", "--kd-caches", f"{other}={cache}"),
             "does not match data prefix", "fingerprint")  # fmt: skip
    _refused(_base(prefix, tmp_path / "v", "--kd-caches", f"{prefix}={cache}",
                   "--model-vocab-size", "5000"), "model.vocab_size=5000")  # fmt: skip


def test_document_options_on_data_without_end_of_document_ids(tmp_path):
    # Prepared without --append-eod: megatron-core finds a packed sample's documents by the
    # id, so --data-reset-attention-mask kept nothing apart, with no word.
    import numpy as np

    rng = np.random.default_rng(0)
    prefix = write_dataset(tmp_path / "noeod", [rng.integers(0, 99, 150) for _ in range(40)])
    (tmp_path / "noeod.meta.json").write_text(json.dumps(
        {"tokenizer": {"fingerprint": "t", "vocab_size": 100, "eod": 99}}))  # fmt: skip
    for flag in ("--data-reset-attention-mask", "--data-eod-mask-loss"):
        _refused(_base(prefix, tmp_path / flag, "--kd-ce-only", flag), prefix, flag,
                 "end-of-document id 99", "--append-eod")  # fmt: skip


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--parallel-tensor", "2"], ["does not divide the 1 processes"]),
        (["--parallel-tensor", "3"], ["num_attention_heads=4"]),
        (["--parallel-pipeline", "2", "--model-num-layers", "3"], ["num_layers=3"]),
        (["--train-global-batch-size", "3"], ["global_batch_size=3"]),
        (["--parallel-tensor", "2", "--parallel-sequence-parallel"], ["Transformer Engine"]),
    ],
)
def test_parallel_sizes_that_do_not_fit(markov, tmp_path, extra, needles):
    prefix, cache = markov
    _refused(_base(prefix, tmp_path / "p", "--kd-caches", f"{prefix}={cache}", *extra), *needles)


def test_checkpoint_of_another_model_shape(markov, tmp_path):
    prefix, cache = markov
    run = tmp_path / "run"
    slkd(*_base(prefix, run, "--kd-caches", f"{prefix}={cache}"))
    assert (run / "checkpoints" / "latest").is_file()
    _refused(_base(prefix, run, "--kd-caches", f"{prefix}={cache}", "--model-hidden-size", "96"),
             "model.hidden_size: checkpoint 64, now 96", "--checkpoint-dir",
             before_megatron=True)  # fmt: skip
    _refused(_base(prefix, run, "--kd-caches", f"{prefix}={cache}", "--data-split", "80,20,0"),
             "data order", "data.split: checkpoint '90,10,0', now '80,20,0'",
             before_megatron=True)  # fmt: skip
    (run / "config.yaml").write_text("model: [unclosed")  # a run's config cut short
    _refused(_base(prefix, run, "--kd-caches", f"{prefix}={cache}"),
             f"{run / 'config.yaml'}: unreadable config of the checkpointed run",
             before_megatron=True)  # fmt: skip


def test_resume_on_a_dataset_rewritten_in_place(markov, tmp_path):
    # Preprocessed again at the same path (here by megatron-core's own builder, as
    # Megatron-LM's preprocess_data.py does): same paths and settings, other documents.
    # Resuming used to cut the new documents into samples and go on, the order changed.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = _copy_prefix(markov[0], tmp_path / "data")
    run = tmp_path / "run"
    slkd(*_base(prefix, run, "--kd-ce-only"))
    docs = IndexedDataset(prefix)
    kept = [np.array(docs[i]) for i in range(1, len(docs))]  # the first one dropped
    del docs  # its memory map: the rewrite truncates the file under it (SIGBUS)
    write_dataset(prefix, kept)
    last = _refused(_base(prefix, run, "--kd-ce-only"), str(run), f"{prefix} was rewritten",
                    "--no-checkpoint-resume", before_megatron=True)  # fmt: skip
    assert "other data" in last
    # Starting over records the new layout: the next resume compares against it.
    slkd(*_base(prefix, run, "--kd-ce-only", "--no-checkpoint-resume"))
    assert json.loads((run / "data_layout.json").read_text())["index_keys"] == {
        prefix: index_key(prefix)
    }
    (run / "data_layout.json").write_text("{")  # cut short
    _refused(_base(prefix, run, "--kd-ce-only"), "data_layout.json: unreadable data layout",
             before_megatron=True)  # fmt: skip


def _train_lr(run_dir) -> dict:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["lr"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_resume_with_other_train_steps(markov, tmp_path):
    # megatron-core shuffles over as many epochs as the sample count needs, and its
    # scheduler and torch's Adam keep a checkpoint's settings: a resume with more steps
    # used to go on in another order at the old schedule's end (min_lr), with no word.
    prefix, cache = markov
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    args = ("--kd-caches", f"{prefix}={cache}", "--log-interval", "1")
    slkd(*_base(prefix, run, *args))  # 1 step: 2 samples of an epoch of about 200
    more = (*args, "--train-steps", "4", "--optim-adam-beta2", "0.5")
    out = slkd(*_base(prefix, run, *more)).stdout
    assert "train.steps 1 -> 4: the 2 samples consumed keep their order" in out
    changed = next(ln for ln in out.splitlines() if ln.startswith("optimizer settings"))
    assert "adam_beta2 0.95 -> 0.5" in changed and "lr_decay_steps 1 -> 4" in changed
    slkd(*_base(prefix, fresh, *more))  # the schedule a 4-step run has from the start
    assert [_train_lr(run)[k] for k in (2, 3, 4)] == [_train_lr(fresh)[k] for k in (2, 3, 4)]
    # The checkpoint now holds this run's settings: nothing to say on the next resume.
    out = slkd(*_base(prefix, run, *more)).stdout
    assert "resumed from" in out and "optimizer settings" not in out, out
    # 400 steps are 800 samples, 4 epochs: megatron-core orders them otherwise.
    last = _refused(_base(prefix, run, *args, "--train-steps", "400"),
                    f"{run} holds checkpoints of a 4-step run", "sample 0 of the 8 consumed",
                    "keep --train-steps 4", "--no-checkpoint-resume")  # fmt: skip
    assert "order mid-run" in last
    _refused(_base(prefix, run, *args, "--train-steps", "3"),
             "the run is at step 4, past --train-steps 3", before_megatron=True)  # fmt: skip


def test_ce_only_runs_without_cache(markov, tmp_path):
    prefix, _ = markov
    r = slkd(*_base(prefix, tmp_path / "ce", "--kd-ce-only", "--json"))
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["step"] == 1 and final["eval"]["kl"] is None and final["eval"]["ece"] >= 0


def test_damaged_cache_stops_with_the_stores_error(markov, tmp_path):
    prefix, cache = markov
    broken = tmp_path / "broken-cache"
    shutil.copytree(cache, broken)
    shard = next(broken.glob("*.slkd"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the chunk data: found on first read, by a worker
    shard.write_bytes(bytes(data))
    args = _base(prefix, tmp_path / "run", "--kd-caches", f"{prefix}={broken}",
                 "--data-num-workers", "1", "--train-steps", "40")  # fmt: skip
    last = _refused(args, str(shard.name), "corrupt", before_first_step=False)
    assert "DataLoader" not in last


def _copy_prefix(prefix: str, to) -> str:
    """A second data prefix holding the same documents (and record)."""
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(prefix + ext, str(to) + ext)
    return str(to)


def test_per_split_blends_map_to_their_caches_by_prefix(markov, tmp_path):
    # Megatron's --train-data-path / --valid-data-path: each blend's prefixes need a cache.
    prefix, cache = markov
    other = _copy_prefix(prefix, tmp_path / "copy")
    base = _base(prefix, tmp_path / "r")
    i = base.index("--data-path")
    del base[i : i + 4]  # no --data-path / --data-split
    blends = ["--data-train-path", "0.7", prefix, "0.3", other, "--data-valid-path", other]
    _refused([*base, *blends, "--kd-caches", f"{prefix}={cache}"], other, "no sparse-logit cache")
    r = slkd(*base, *blends, "--kd-caches", f"{prefix}={cache}", f"{other}={cache}",
             "--checkpoint-dir", str(tmp_path / "ok"))  # fmt: skip
    log = [json.loads(x) for x in open(tmp_path / "ok" / "train_log.jsonl")]
    assert any(x.get("kind") == "eval" and x["tokens"] > 0 for x in log), r.stdout[-2000:]
    _refused([*base, "--data-path", prefix, *blends], "either data.path")
    # Resuming that run on the blend reweighted would change its sample order.
    blends[1:5] = ["0.3", prefix, "0.7", other]
    _refused([*base, *blends, "--kd-caches", f"{prefix}={cache}", f"{other}={cache}",
              "--checkpoint-dir", str(tmp_path / "ok")], "data order",
             "data.train_path: checkpoint ['0.7',", before_megatron=True)  # fmt: skip


def test_weighted_blend_trains_with_a_cache_per_prefix(markov, tmp_path):
    # --data-path 0.5 A 0.5 B (BlendedDataset samples carry a numpy dataset_id).
    prefix, cache = markov
    other = _copy_prefix(prefix, tmp_path / "copy")
    base = _base(prefix, tmp_path / "r")
    i = base.index("--data-path")
    base[i + 1 : i + 2] = ["0.5", prefix, "0.5", other]
    _refused([*base, "--kd-caches", f"{prefix}={cache}"], other, "no sparse-logit cache")
    slkd(*base, "--kd-caches", f"{prefix}={cache}", f"{other}={cache}")
    log = [json.loads(x) for x in open(tmp_path / "r" / "train_log.jsonl")]
    assert any(x.get("kind") == "eval" and x["kl"] is not None for x in log)


def test_a_run_directory_has_one_owner(markov, tmp_path):
    prefix, cache = markov
    run = tmp_path / "r"
    run.mkdir()
    record = {"host": "node-3", "pid": 77, "slurm_job": "9001", "slurm_array_task": None,
              "since": "2026-11-29T01:00:00+0000", "token": "x"}  # fmt: skip
    (run / "run.owner").write_text(dump_record(record))
    _refused(_base(prefix, run, "--kd-caches", f"{prefix}={cache}"),
             "training run is being written by host node-3 pid 77, Slurm job 9001")  # fmt: skip


def test_a_blend_of_caches_from_two_teacher_runs(markov, tmp_path):
    # Two copies of one corpus; the second's cache says another teacher checkpoint wrote
    # it (a cache left over from an older teacher): the student would learn a mixture.
    import dataclasses

    from megatron_slkd.cache import Manifest
    from megatron_slkd.cache.manifest import MANIFEST_NAME

    prefix, cache = markov
    teacher = {"kind": "huggingface", "checkpoint_hash": "sha256:new", "path": "/models/new"}
    caches = {}
    for name in ("a", "b"):
        data, caches[name] = str(tmp_path / name), tmp_path / f"{name}-cache"
        for ext in (".bin", ".idx", ".meta.json"):
            shutil.copy(prefix + ext, data + ext)
        shutil.copytree(cache, caches[name])
    base = dataclasses.replace(Manifest.read(cache), teacher=teacher)

    def write(name, **changes):
        m = dataclasses.replace(base, **changes)
        (caches[name] / MANIFEST_NAME).write_text(m.to_json())

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    blend = ["--data-path", "0.5", a, "0.5", b, "--kd-caches", f"{a}={caches['a']}",
             f"{b}={caches['b']}"]  # fmt: skip
    write("a")
    write("b", teacher={**teacher, "checkpoint_hash": "sha256:older"})
    last = _refused(_base(a, tmp_path / "r1", *blend), "2 teacher runs",
                    "teacher.checkpoint_hash ('sha256:new' vs 'sha256:older')",
                    "--kd-allow-mixed-teachers", before_megatron=True)  # fmt: skip
    assert str(caches["a"]) in last and str(caches["b"]) in last
    write("b", sampling={**base.sampling, "temperature": 2.0})
    _refused(_base(a, tmp_path / "r2", *blend), "temperature (1.0 vs 2.0)",
             before_megatron=True)  # fmt: skip
    # Where only the noise differs (N, the seed, where the teacher lay), it is one teacher.
    write("b", sampling={**base.sampling, "num_samples": 12, "seed": 7},
          teacher={**teacher, "path": "/elsewhere/new"})  # fmt: skip
    slkd(*_base(a, tmp_path / "r3", *blend))
    write("b", teacher={**teacher, "checkpoint_hash": "sha256:older"})
    slkd(*_base(a, tmp_path / "r4", *blend, "--kd-allow-mixed-teachers"))
