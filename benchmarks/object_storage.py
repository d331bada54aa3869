"""Caches on object storage: training data wait and read throughput, with injected latency.

    python benchmarks/object_storage.py [--latency-ms 20] [--tokens 3000000] [--steps 60]
                                        [--no-save]

A real S3-protocol server (moto's server mode, its own process) behind a proxy
that holds every request ``--latency-ms`` before forwarding it. A synthetic
RS cache (N = 50, V = 49152, about 12 entries per position; benchmarks/scale.py's
rows) over a synthetic dataset is uploaded to it. Then:

- the demo's student (examples/configs/demo_student.yaml: TP = 2 under torchrun,
  one loader worker per rank) trains ``--steps`` steps once on the local cache
  and once on ``s3://`` through the proxy, with an empty local chunk cache;
  the figure is the training log's data wait (time in the loader's ``next``
  over step time), averaged over the log windows after the first
  (target: at most 2% with 20 ms per request);
- one process reads random 4096-token spans from the local cache and from
  ``s3://`` (every read a miss of the local chunk cache: latency-bound), and
  a sequential pass over ``s3://`` with read-ahead of 8 spans.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "demo_student.yaml"


def _cache(root: Path, tokens: int) -> tuple[str, Path]:
    """A synthetic dataset (with a tokenizer record) and its one-shard RS cache."""
    import scale

    from megatron_slkd.data.prepare import META_SUFFIX

    prefix = str(root / "data")
    scale._write_dataset(prefix, tokens, seed=0)
    meta = {"tokenizer": {"fingerprint": "synthetic", "vocab_size": scale.VOCAB,
                          "eod": scale.VOCAB - 1}}  # fmt: skip
    Path(prefix + META_SUFFIX).write_text(json.dumps(meta))
    out = root / "cache"
    out.mkdir()
    scale._writer(0, 1, prefix, str(out), 4, 0)
    from megatron_slkd.cache.merge import merge_cache

    merge_cache([out], out)
    return prefix, out


def _upload(server, directory: Path, key: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=server.url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    for f in sorted(directory.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), "bench", f"{key}/{f.name}")
    return f"s3://bench/{key}"


def _train(prefix: str, cache: str, run_dir: Path, steps: int, env: dict) -> dict:
    from megatron_slkd.testing import free_port

    argv = ["--config", str(CONFIG), "--data-path", prefix, "--kd-caches", f"{prefix}={cache}",
            "--train-steps", str(steps), "--checkpoint-dir", str(run_dir),
            "--checkpoint-interval", str(steps), "--eval-interval", str(steps),
            "--data-index-cache", str(run_dir.parent / "index-cache"),
            "--no-log-tensorboard"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "megatron_slkd.training", *argv]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"training on {cache} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rows = [x for x in rows if x["kind"] == "train"]
    later = rows[1:] or rows
    return {
        "data_wait": float(np.mean([x["data_wait"] for x in later])),
        "data_wait_first_window": rows[0]["data_wait"],
        "step_seconds": float(np.mean([x["step_time"] for x in later]))
        if "step_time" in later[0]
        else None,
        "windows": len(rows),
        "losses": [x["loss"] for x in rows],
    }


def _span_reads(cache, count: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, cache.num_tokens - 4096, count)
    t = time.perf_counter()
    for s in starts.tolist():
        cache.read_tokens(int(s), 4096)
    return count / (time.perf_counter() - t)


def _sequential(cache, spans: int, ahead: int = 8) -> float:
    """Tokens per second reading consecutive 4096-token spans, fetching ``ahead`` ahead."""

    def fetch(k: int) -> None:
        start = k * 4096
        si = int(np.searchsorted(cache._token_starts, start, side="right")) - 1
        n = min(4096, int(cache._token_starts[si + 1]) - start)
        cache.shards[si].prefetch([start - int(cache._token_starts[si])], [n])

    t = time.perf_counter()
    for k in range(1, min(ahead + 1, spans)):
        fetch(k)
    for i in range(spans):
        if i and i + ahead < spans:
            fetch(i + ahead)
        cache.read_tokens(i * 4096, 4096)
    return spans * 4096 / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--latency-ms", type=float, default=20.0, help="held per request")
    p.add_argument("--tokens", type=int, default=3_000_000, help="dataset size")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--dir", default=None, help="where to write (default: the temp directory)")
    p.add_argument("--no-save", action="store_true", help="print, do not append to results/")
    args = p.parse_args()

    from megatron_slkd.cache import open_cache
    from megatron_slkd.object_testing import FaultProxy, S3Server

    root = Path(tempfile.mkdtemp(prefix="slkd-object-", dir=args.dir))
    server = S3Server()
    proxy = FaultProxy(server.url, delay=args.latency_ms / 1000)
    try:
        server.create_bucket("bench")
        prefix, cache = _cache(root, args.tokens)
        url = _upload(server, cache, "cache")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   **server.environment(proxy.url),
                   SLKD_OBJECT_CACHE_DIR=str(root / "objects"))  # fmt: skip
        os.environ.update(env)
        local_run = _train(prefix, str(cache), root / "run-local", args.steps, env)
        before = proxy.requests
        s3_run = _train(prefix, url, root / "run-s3", args.steps, env)
        requests = proxy.requests - before
        same = local_run.pop("losses") == s3_run.pop("losses")
        record("object_storage", "training_data_wait", not args.no_save,
               latency_ms=args.latency_ms, steps=args.steps, local=local_run, s3=s3_run,
               s3_requests=requests, losses_equal=same, target_data_wait=0.02,
               config="examples/configs/demo_student.yaml")  # fmt: skip

        here = open_cache(cache)
        shutil.rmtree(root / "objects", ignore_errors=True)
        remote = open_cache(url, local_cache_dir=root / "objects-reads")
        local_rate = _span_reads(here, 400)
        remote_rate = _span_reads(remote, 60, seed=1)
        shutil.rmtree(root / "objects-reads", ignore_errors=True)
        remote = open_cache(url, local_cache_dir=root / "objects-seq")
        spans = min(200, here.num_tokens // 4096 - 1)
        seq = _sequential(remote, spans)
        mb_per_token = sum(s["size_bytes"] for s in here.manifest.shards) / here.num_tokens / 1e6
        record("object_storage", "reads", not args.no_save, latency_ms=args.latency_ms,
               local_random_spans_per_s=round(local_rate, 1),
               s3_random_spans_per_s_cold=round(remote_rate, 1),
               s3_sequential_tokens_per_s=round(seq),
               s3_sequential_mb_per_s=round(seq * mb_per_token, 1),
               local_random_mb_per_s=round(local_rate * 4096 * mb_per_token, 1),
               span_tokens=4096)  # fmt: skip
    finally:
        proxy.close()
        server.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
