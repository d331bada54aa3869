"""A process of a `slkd train` run that dies or hangs stops the others with one line.

Two ranks started as srun starts them (``testing.lose_a_process``: independent processes,
nothing stops the others when one dies, unlike torchrun). After step 7, one of these is
lost:

- rank 1 itself, killed (SIGKILL) or stopped (SIGSTOP: a hung process or machine, which
  NCCL would wait 10 minutes for and gloo 30);
- a data loader worker of rank 0, killed (the out-of-memory killer's usual victim):
  torch's traceback on rank 0, then gloo's on rank 1, before;
- a data loader worker of rank 0, stopped (SIGSTOP, a frozen cgroup): rank 0 hung for
  ever in torch's hand-over of a queued batch, where no timeout reaches, and rank 1 with
  it, since rank 0's heartbeat thread went on; now rank 0 stops 10 s past
  ``--data-loader-timeout`` (``training.data.handover_deadline``), and rank 1 with it;
- megatron-core's checkpoint writer process of rank 0: the next save failed on rank 0
  alone while rank 1 waited in the save's own barrier, and both hung.

Every surviving process ends with exactly one ``slkd train:`` line (rank 1 quoting rank
0's error where rank 0 had one), no traceback, exit status 1 (2 for rank 0's own
checkpoint error); the checkpoints are kept and the same command resumes from them.
"""

import socket
import time

import pytest
import torch

from megatron_slkd.testing import LOST, lose_a_process, srun_like
from megatron_slkd.training.checkpoint import latest_checkpoint


def _args(prefix, cache, run_dir, steps=40):
    return [
        "train", "--data-path", prefix, "--kd-caches", f"{prefix}={cache}",
        "--data-split", "90,10,0", "--data-index-cache", str(run_dir.parent / "index-cache"),
        "--model-num-layers", "2", "--model-hidden-size", "64", "--model-ffn-hidden-size", "128",
        "--model-seq-length", "64", "--train-steps", str(steps), "--train-micro-batch-size",
        "2", "--train-global-batch-size", "8", "--checkpoint-interval", "5",
        "--eval-interval", "0", "--eval-batches", "1", "--checkpoint-dir", str(run_dir),
        "--data-num-workers", "1", "--parallel-peer-timeout", "4",
    ]  # fmt: skip


def _quotes(lines: list[str], word: str, err: str) -> None:
    """Rank 1's one line quotes rank 0's ``word`` whole: from its collective's error (the
    line ends there), or, where rank 0's exit took longer than the watch's grace (a loaded
    machine), from its watch thread, which adds why it stops rather than wait."""
    said = f"slkd train: stopped: {word}"
    assert len(lines) == 1 and lines[0] in (
        said, f"{said}; this process stops rather than wait for it in a collective"
    ), err[-3000:]  # fmt: skip


@pytest.mark.slow
# (rank 1 killed: the same path as stopped here, where gloo does not notice first; it is
# in benchmarks/peer_loss.py, and the build's test kills a peer)
@pytest.mark.parametrize("lost", [x for x in LOST if x != "rank killed"])
def test_a_lost_process_stops_the_run_with_one_line(markov, tmp_path, lost):
    prefix, cache = markov
    run_dir = tmp_path / "run"
    args = _args(prefix, cache, run_dir)
    if lost == "loader worker stopped":
        args += ["--data-loader-timeout", "3"]  # then 10 s more: handover_deadline
    r = lose_a_process(args, lost, tmp_path / "logs")
    procs, victim, errs, lines = r["procs"], r["victim"], r["errs"], r["lines"]
    assert r["waited"] is not None, f"a rank was still running 90 s later: {errs}"
    who0 = f"rank 0 of this run (host {socket.gethostname()}, pid {procs[0].pid}) stopped: "
    if victim is not None:
        print(f"rank 0 stopped {r['waited']:.1f} s after rank 1 was {lost.split()[1]}")
        assert procs[0].returncode == 1 and len(lines[0]) == 1, errs[0][-3000:]
        assert "Traceback" not in errs[0], errs[0][-3000:]
        line = lines[0][0]
        assert line.startswith("slkd train: stopped: ") and "resume" in line, line
        if lost == "rank stopped":
            assert f"rank 1 of this run (host {socket.gethostname()}, pid {victim.pid}) has " \
                "sent no heartbeat for" in line, line  # fmt: skip
            assert r["waited"] < 30, r["waited"]  # 4 s of silence, then a beat or two
    elif lost == "loader worker stopped":  # the hand-over hangs: only the deadline sees it
        print(f"rank 0 stopped {r['said'][0]:.1f} s after its loader worker was stopped")
        assert [p.returncode for p in procs] == [1, 1], errs
        own = "this process has waited 13 s for a micro-batch from its data loader workers"
        assert lines[0] == [f"slkd train: stopped: {own}{lines[0][0][21 + len(own):]}"], errs[0]
        assert "stopped or frozen" in lines[0][0] and "resume" in lines[0][0], lines[0]
        assert len(lines[1]) == 1 and lines[1][0].startswith(
            f"slkd train: stopped: {who0}{own}"), errs[1][-3000:]  # fmt: skip
        assert r["waited"] < 40, r["waited"]
    elif lost == "loader worker killed":
        assert [p.returncode for p in procs] == [1, 1], errs
        own = "slkd train: stopped: a data loader worker of this process "
        assert len(lines[0]) == 1 and lines[0][0].startswith(own), errs[0][-3000:]
        _quotes(lines[1], f"{who0}{lines[0][0][21:]}", errs[1])
    else:
        assert [p.returncode for p in procs] == [2, 1], errs
        own = "megatron-core's writer process is gone"
        assert len(lines[0]) == 1 and own in lines[0][0], errs[0][-3000:]
        _quotes(lines[1], f"{who0}{lines[0][0][19:]}", errs[1])
    if victim is None:
        assert not any("Traceback" in e for e in errs), errs
    assert latest_checkpoint(run_dir) is not None
    if lost == "checkpoint writer killed":  # the one that hung: the same command goes on (once)
        import subprocess

        procs = srun_like(args, stdout=lambda r: subprocess.PIPE if r == 0 else None,
                          stderr=subprocess.PIPE)  # fmt: skip
        out, err = procs[0].communicate(timeout=300)
        assert [p.wait(timeout=60) for p in procs] == [0, 0], err[-3000:]
        assert "resumed from" in out and "step 40/40" in out, out[-2000:]


class _Stalls(torch.utils.data.Dataset):
    """Micro-batches 0 and 1 at once, then a read that hangs (a stalled file system)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i >= 2:
            time.sleep(60)
        return {"tokens": torch.full((4,), i)}


def test_a_loader_worker_that_hangs_stops_after_the_loader_timeout_and_is_killed():
    # The worker's main thread hangs in a read; it still hands over what it finished. A
    # worker frozen whole (SIGSTOP) would hang the training process inside torch's hand-
    # over of a batch, which no timeout covers.
    from megatron_slkd.training.data import make_loader, stop_workers, worker_death

    loader = make_loader(_Stalls(), consumed=0, micro=1, dp_rank=0, dp=1, num_workers=1,
                         timeout=1.0)  # fmt: skip
    it = iter(loader)
    assert [int(next(it)["tokens"][0, 0]) for _ in range(2)] == [0, 1]
    t = time.monotonic()
    with pytest.raises(RuntimeError) as got:
        next(it)
    assert time.monotonic() - t < 10
    err = worker_death(got.value)
    assert str(err).startswith("the data loader workers of this process handed over no "
                               "micro-batch for 1 s (--data-loader-timeout)"), err  # fmt: skip
    workers = list(it._workers)
    t = time.monotonic()
    stop_workers(it)
    assert time.monotonic() - t < 5 and not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("text,says", [
    ("DataLoader worker (pid 6029) is killed by signal: Killed. ",
     "(pid 6029) was killed by signal: Killed (the out-of-memory killer, most likely"),
    ("DataLoader worker (pid 77) is killed by signal: Bus error. It is possible that "
     "dataloader's workers are out of shared memory. Please try to raise your shared memory "
     "limit.", "(pid 77) was killed by signal: Bus error (out of shared memory (/dev/shm)"),
    ("DataLoader worker (pid(s) 6029, 6030) exited unexpectedly",
     "(pid 6029, 6030) exited unexpectedly (killed, by the out-of-memory killer most likely"),
    ("DataLoader worker (pid 12) exited unexpectedly with exit code 1. Details are lost due "
     "to multiprocessing.", "(pid 12) exited unexpectedly with exit code 1 (killed,"),
])  # fmt: skip
def test_torchs_reports_of_a_dead_loader_worker_are_typed(text, says):
    from megatron_slkd.training.data import worker_death

    err = worker_death(RuntimeError(text))
    assert err is not None and err.exit_status == 1
    assert str(err).startswith(f"a data loader worker of this process {says}"), str(err)
    assert str(err).endswith("run the same command again to resume from the last one")
    assert worker_death(RuntimeError("CUDA out of memory")) is None
    assert worker_death(ConnectionResetError(104, "not between processes")) is None
