"""GPU figures: the sparse KD loss against megatron-core's cross-entropy, and the sampler.

    python benchmarks/gpu.py [--tokens 16384] [--vocab 131072] [--repeats 10] [--no-save]

On one CUDA device (a one-process NCCL group, TP = 1), bf16 logits ``[tokens, 1, V]``:

- loss: forward plus backward of ``vocab_parallel_sparse_kd_loss`` (K = 12 targets,
  alpha 0.5) against megatron-core's ``vocab_parallel_cross_entropy`` on the same
  logits; the time ratio (goal: at most 1.05) and the peak memory above the inputs;
- sampler: RS N = 50 draws per token from the same logits, tokens per second.

Timings are the median of ``--repeats`` runs after two warm-ups, with CUDA events.
Refuses to run without a CUDA device (nothing here is measured on CPU).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=16384, help="tokens (s x b)")
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary size")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions (median kept)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; nothing GPU-specific is measured")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_slkd.launch import init_distributed
    from megatron_slkd.loss import vocab_parallel_sparse_kd_loss
    from megatron_slkd.sampling import sample_sparse_targets

    init_distributed(1, "cuda")
    dev, t, v, k = torch.device("cuda"), args.tokens, args.vocab, 12
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(t, 1, v, device=dev, generator=g) * 2).to(torch.bfloat16)
    ids = torch.randint(0, v, (t, 1, k), device=dev, generator=g)
    w = torch.rand(t, 1, k, device=dev, generator=g)
    w /= w.sum(-1, keepdim=True)
    labels = torch.randint(0, v, (t, 1), device=dev, generator=g)

    def ce():
        x = logits.detach().clone().requires_grad_()
        vocab_parallel_cross_entropy(x, labels).sum().backward()

    def kd():
        x = logits.detach().clone().requires_grad_()
        vocab_parallel_sparse_kd_loss(x, ids, w, labels, alpha=0.5).loss.sum().backward()

    ce_ms, kd_ms = _median_ms(ce, args.repeats), _median_ms(kd, args.repeats)
    ce_mb, kd_mb = _peak_mb(ce), _peak_mb(kd)
    name = torch.cuda.get_device_name()
    record("gpu", "loss_fwd_bwd_bf16", save=not args.no_save, device=name, tokens=t, vocab=v,
           k=k, megatron_ce_ms=round(ce_ms, 3), sparse_kd_ms=round(kd_ms, 3),
           ratio=round(kd_ms / ce_ms, 3), megatron_ce_peak_mb=round(ce_mb, 1),
           sparse_kd_peak_mb=round(kd_mb, 1), target="ratio <= 1.05")  # fmt: skip

    flat = logits.view(t, v)
    positions = torch.arange(t, device=dev)

    def sample():
        sample_sparse_targets(flat, method="rs", num_samples=50, seed=1, positions=positions)

    ms = _median_ms(sample, args.repeats)
    record("gpu", "sampler_rs_n50_bf16", save=not args.no_save, device=name, tokens=t, vocab=v,
           ms=round(ms, 3), tokens_per_second=round(t / (ms / 1000)))  # fmt: skip


if __name__ == "__main__":
    main()
