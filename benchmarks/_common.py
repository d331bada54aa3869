"""Shared helpers of the benchmarks: one JSON line per measurement."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def record(bench: str, name: str, save: bool = True, **fields) -> dict:
    """Print one measurement as a JSON line (and append it to results/<bench>.jsonl)."""
    row = {
        "benchmark": bench,
        "measurement": name,
        **fields,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }
    line = json.dumps(row, sort_keys=True)
    print(line, flush=True)
    if save:
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / f"{bench}.jsonl", "a") as f:
            f.write(line + "\n")
    return row


def best_of(fn, repeats: int = 5) -> float:
    """Fastest wall time of ``repeats`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
