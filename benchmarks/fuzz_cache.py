"""Fuzz the cache reader: flip and truncate bytes of shards and manifests.

    python benchmarks/fuzz_cache.py [--cases 10000] [--no-save]

Every case damages one file of a small valid cache (1 to 4 bit flips, or a
truncation), then opens the cache and reads every token. Allowed outcomes: a
megatron-slkd error (``SlkdError``), or a read identical to the undamaged one
(a flip that changed nothing read, such as in a free-form manifest field).
Anything else (another exception, different data returned, a case slower than
the time limit, memory growth) is a failure. The test suite runs the same
property with hypothesis on a few hundred cases; this run does at least 10,000.
"""

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _common import record  # noqa: E402
from helpers import write_synthetic_cache  # noqa: E402

from megatron_slkd.cache import open_cache  # noqa: E402
from megatron_slkd.errors import SlkdError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", type=int, default=10_000, help="number of damaged caches to read")
    p.add_argument("--seed", type=int, default=0, help="RNG seed")
    p.add_argument("--case-limit", type=float, default=2.0, help="seconds allowed per case")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        clean = write_synthetic_cache(
            Path(tmp) / "clean", [9, 1, 30, 4, 70, 17, 2, 120], num_shards=3, chunk_tokens=16
        )
        ref = open_cache(clean.path).read_tokens(0, sum(len(d) for d in clean.docs))
        files = sorted(clean.path.iterdir())
        originals = {f.name: f.read_bytes() for f in files}
        work = Path(tmp) / "work"
        shutil.copytree(clean.path, work)
        outcomes = {"library_error": 0, "unchanged": 0}
        failures, slowest = [], 0.0
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for case in range(args.cases):
            name = files[rng.integers(len(files))].name
            raw = bytearray(originals[name])
            if rng.random() < 0.75:
                for _ in range(rng.integers(1, 5)):
                    raw[rng.integers(len(raw))] ^= 1 << rng.integers(8)
            else:
                raw = raw[: rng.integers(len(raw))]
            (work / name).write_bytes(bytes(raw))
            t = time.perf_counter()
            try:
                reader = open_cache(work)
                got = reader.read_tokens(0, reader.num_tokens)
                same = (
                    got.ids.shape == ref.ids.shape
                    and np.array_equal(got.ids, ref.ids)
                    and np.array_equal(got.weights, ref.weights)
                )
                if same:
                    outcomes["unchanged"] += 1
                else:
                    failures.append(f"case {case} ({name}): different data returned")
            except SlkdError:
                outcomes["library_error"] += 1
            except Exception as exc:  # noqa: BLE001 - any other exception is the failure we seek
                failures.append(f"case {case} ({name}): {type(exc).__name__}: {exc}")
            slowest = max(slowest, time.perf_counter() - t)
            (work / name).write_bytes(originals[name])
        rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if slowest > args.case_limit:
        failures.append(f"slowest case took {slowest:.2f} s")
    record(
        "fuzz_cache",
        "flip_and_truncate",
        save=not args.no_save,
        cases=args.cases,
        **outcomes,
        failures=len(failures),
        first_failures=failures[:5],
        slowest_case_seconds=round(slowest, 4),
        rss_growth_mb=round(rss_growth_mb, 1),
        target="failures == 0",
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
