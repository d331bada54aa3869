"""What a teacher's identity costs: every byte hashed once, then a stat per file.

    python benchmarks/teacher_hash.py [--gb 4] [--files 4] [--dir /tmp/slkd-teacher] [--keep]
        [--no-save]

Writes a teacher directory of ``--files`` weight files, ``--gb`` GB in all (random
bytes, as trained weights are; plus a config.json), dates them back past the
settling time, then times ``checkpoint_hash`` (what ``build-cache`` and the
cache's teacher record use) three ways: the first hash from a cold page cache
(as root the caches are dropped first; otherwise warm and said so), the same
again once the record exists (a stat per file), and with the record removed from
a warm page cache (the hash alone, on every CPU).
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402


def write_teacher(path: Path, total: int, files: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    each = total // files
    block = os.urandom(1 << 26)
    for i in range(files):
        with open(path / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            left = each
            while left:
                n = min(left, len(block))
                f.write(block[:n] if i % 2 == 0 else block[n - 1 :: -1][:n])
                left -= n
    for f in path.iterdir():
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--gb", type=float, default=4.0, help="size of the teacher's weight files")
    p.add_argument("--files", type=int, default=4, help="weight files it is split into")
    p.add_argument("--dir", default="/tmp/slkd-teacher", help="where the teacher is written")
    p.add_argument("--keep", action="store_true", help="keep the teacher for a rerun")
    p.add_argument("--no-save", action="store_true", help="print, do not append to results/")
    args = p.parse_args()
    from megatron_slkd import identity
    from megatron_slkd.teacher.hf import checkpoint_hash

    root = Path(args.dir)
    total = int(args.gb * 1e9)
    if not root.exists():
        if total > 0.9 * shutil.disk_usage(root.parent).free:
            sys.exit(f"not enough room in {root.parent} for {args.gb} GB")
        t = time.perf_counter()
        write_teacher(root, total, args.files)
        print(f"wrote {args.gb} GB in {time.perf_counter() - t:.1f} s")
    (root / identity.HASH_RECORD_NAME).unlink(missing_ok=True)
    cold = os.geteuid() == 0
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t = time.perf_counter()
    first = checkpoint_hash(root)
    dt_first = time.perf_counter() - t
    assert (root / identity.HASH_RECORD_NAME).is_file(), "no record was written"
    t = time.perf_counter()
    assert checkpoint_hash(root) == first
    dt_later = time.perf_counter() - t
    (root / identity.HASH_RECORD_NAME).unlink()
    t = time.perf_counter()
    assert checkpoint_hash(root) == first
    dt_warm = time.perf_counter() - t
    record("teacher_hash", "checkpoint_hash", not args.no_save, bytes=total, files=args.files,
           first_seconds=round(dt_first, 2), first_page_cache="cold" if cold else "warm",
           first_gb_per_s=round(total / dt_first / 1e9, 2),
           warm_rehash_seconds=round(dt_warm, 2), warm_gb_per_s=round(total / dt_warm / 1e9, 2),
           later_seconds=round(dt_later, 4), threads=len(os.sched_getaffinity(0)))  # fmt: skip
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
