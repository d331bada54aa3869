"""Teachers straight from checkpoints that Megatron-LM's own ``save_checkpoint`` wrote.

``megatron_lm_checkpoints/`` holds two such checkpoints and the logits of the
model that was saved, computed by Megatron-LM's model (see its README for the
command): a Llama-style model (RMSNorm, SwiGLU, RoPE, grouped-query attention,
untied output layer, float32) and a GPT-2-style one (LayerNorm, GeLU, biases,
learned positions, tied embeddings, QK layernorm, saved in bf16). With
``MEGATRON_LM_DIR`` set, the last test writes them afresh with that checkout.
"""

import argparse
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import megatron_lm_env, needs_megatron_lm, slkd, torchrun_slkd, write_dataset

from megatron_slkd.cache import open_cache
from megatron_slkd.data.tokenizers import NullTokenizer
from megatron_slkd.teacher.hf import TeacherError
from megatron_slkd.teacher.megatron_lm import find_iteration, read_args, teacher_spec
from megatron_slkd.testing import run_distributed

CHECKPOINTS = Path(__file__).parent / "megatron_lm_checkpoints"
HARNESS = Path(__file__).parents[1] / "system" / "megatron_lm_checkpoint.py"
_ARCH = {
    "llama": ["--num-layers", "2", "--ffn-hidden-size", "64", "--group-query-attention",
              "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu",
              "--position-embedding-type", "rope", "--rotary-base", "500000",
              "--disable-bias-linear", "--untie-embeddings-and-output-weights"],
    "gpt2": ["--num-layers", "2", "--bf16", "--qk-layernorm", "--add-qkv-bias"],
    # Written only with a checkout at hand (no fixture): the other arguments the model takes.
    "squared-relu": ["--num-layers", "2", "--squared-relu", "--position-embedding-type", "rope",
                     "--rotary-percent", "0.5", "--rotary-interleaved", "--normalization",
                     "RMSNorm", "--norm-epsilon", "1e-6"],
    "llama3-scaling": ["--num-layers", "3", "--swiglu", "--position-embedding-type", "rope",
                       "--use-rope-scaling", "--rotary-base", "500000",
                       "--apply-residual-connection-post-layernorm"],
    "nope": ["--num-layers", "2", "--position-embedding-type", "none",
             "--kv-channels", "16", "--attention-softmax-in-fp32"],
}  # fmt: skip
# NullTokenizer(200): 200 ids and its EOD, whatever --vocab-size means to the release.
_COMMON = ["--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
           "--max-position-embeddings", "64", "--tokenizer-type", "NullTokenizer",
           "--vocab-size", str(NullTokenizer.vocab_size_flag(200)), "--seed", "7"]  # fmt: skip


def _logits_match(rank, world, roots, layouts=((2, 1),)):
    from megatron.core import parallel_state as ps

    from megatron_slkd.teacher.megatron import MegatronTeacher

    for i, (tp, pp) in enumerate(layouts):
        if i:  # the next layout in the same processes (one spawn: start-up is the cost)
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tp, pp)
        for root in map(Path, roots):
            tokens, ref = torch.load(root / "tokens.pt"), torch.load(root / "logits.pt")
            teacher = MegatronTeacher(root / "save")
            got = teacher.logits([tokens[0], tokens[1, :9]])  # windows of different lengths
            if got is None:  # a pipeline stage without the output layer
                continue
            assert teacher.vocab_size == 201  # NullTokenizer(200): the ids and its EOD
            width = 256 // tp
            cols = slice(teacher.tp_rank * width, (teacher.tp_rank + 1) * width)
            assert ref.abs().max() > 0.5  # real signal, not near-zero logits
            for g, r in zip(got, [ref[0], ref[1, :9]], strict=True):
                assert g.shape == (len(r), width)
                assert (g - r[:, cols]).abs().max() < 1e-5, (root, tp, pp, g - r[:, cols])


def test_the_saved_models_logits_come_back_at_any_layout():
    """Both checkpoints at TP 2, then PP 2, then TP 1 (DP 2)."""
    roots = [str(CHECKPOINTS / arch) for arch in ("llama", "gpt2")]
    run_distributed(_logits_match, 2, roots, [(2, 1), (1, 2), (1, 1)], tp=2, megatron=True)


def test_a_cache_built_from_a_megatron_lm_checkpoint_holds_its_top_ids(tmp_path):
    """build-cache --teacher SAVE_DIR at TP=2 under torchrun: the cache's top-8 ids of
    a document are those of the logits Megatron-LM's model gave for the same tokens."""
    from megatron_slkd.data.describe import describe_data
    from megatron_slkd.data.tokenizers import NullTokenizer

    root = CHECKPOINTS / "llama"
    tokens, ref = torch.load(root / "tokens.pt"), torch.load(root / "logits.pt")
    rng = np.random.default_rng(0)
    docs = [[*tokens[0].tolist(), 200], *(list(rng.integers(0, 200, n)) + [200] for n in (40, 70))]
    prefix = write_dataset(tmp_path / "data", docs)
    describe_data(prefix, NullTokenizer(200), progress=False, text_check=False)
    out = tmp_path / "cache"
    torchrun_slkd(2, "build-cache", "--data-prefix", prefix, "--teacher", root / "save",
                  "--tensor-parallel-size", "2", "--method", "topk", "--k", "8",
                  "--context-length", "32", "--output", out, "--no-progress")  # fmt: skip
    slkd("verify-cache", out, "--data-prefix", prefix)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["architecture"] == "megatron-lm"
    assert manifest["teacher"]["source"]["megatron_lm_iteration"] == "iter_0000003"
    got = open_cache(out).read_spans([0], [0], [16])
    want = ref[0, :, :201].topk(8, dim=-1).indices.numpy()
    for row in range(16):
        assert set(got.ids[row].tolist()) == set(want[row].tolist()), row
    # Training went on: the --save directory's latest iteration is another model now.
    save = tmp_path / "save"
    shutil.copytree(root / "save", save)
    later = save / "iter_0000005"
    shutil.copytree(save / "iter_0000003", later)
    (later / "__0_0.distcp").write_bytes(b"\0" + (later / "__0_0.distcp").read_bytes()[1:])
    (save / "latest_checkpointed_iteration.txt").write_text("5")
    r = slkd("build-cache", "--data-prefix", prefix, "--teacher", save, "--method", "topk",
             "--k", "8", "--context-length", "32", "--output", out, check=False)  # fmt: skip
    assert r.returncode == 2 and "iteration iter_0000003" in r.stderr, r.stderr[-2000:]


def _with_args(tmp_path, **changes) -> Path:
    """A copy of the Llama checkpoint whose recorded arguments are changed."""
    save = tmp_path / "save"
    shutil.copytree(CHECKPOINTS / "llama" / "save", save)
    common = save / "iter_0000003" / "common.pt"
    state = torch.load(common, weights_only=False)
    for k, v in changes.items():
        setattr(state["args"], k, v)
    torch.save(state, common)
    read_args.cache_clear()
    return save


@pytest.mark.parametrize("changes,named", [
    ({"num_experts": 8}, "a mixture of experts (--num-experts 8)"),
    ({"multi_latent_attention": True}, "multi-latent attention"),
    ({"window_size": (128, 0)}, "sliding-window attention"),
    ({"position_embedding_type": "yarn"}, "position embedding 'yarn'"),
    ({"apply_layernorm_1p": True}, "zero-centered norm weights"),
])  # fmt: skip
def test_architectures_the_local_spec_cannot_rebuild_are_refused_by_name(tmp_path, changes, named):
    save = _with_args(tmp_path, **changes)
    with pytest.raises(TeacherError, match="cannot rebuild") as err:
        teacher_spec(save)
    assert named in str(err.value) and "iter_0000003" in str(err.value)


def test_checkpoints_it_cannot_read_are_refused_with_what_to_do(tmp_path):
    legacy = tmp_path / "legacy" / "iter_0000010"
    (legacy / "mp_rank_00").mkdir(parents=True)
    (legacy.parent / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(TeacherError, match="legacy 'torch' format.*--ckpt-convert-format"):
        teacher_spec(legacy.parent)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(TeacherError, match="names iter_0000020, but .* does not exist"):
        find_iteration(unfinished)
    cut = tmp_path / "cut"
    shutil.copytree(CHECKPOINTS / "llama" / "save", cut)
    common = cut / "iter_0000003" / "common.pt"
    common.write_bytes(common.read_bytes()[:5000])
    with pytest.raises(TeacherError, match="common.pt: cannot read the checkpoint's arguments"):
        teacher_spec(cut)


def test_recorded_tokenizer_files_that_are_not_here_are_named(tmp_path):
    from megatron_slkd.teacher.megatron_lm import tokenizer_from_args

    save = _with_args(tmp_path, tokenizer_type="GPT2BPETokenizer",
                      vocab_file="/cluster/tok/vocab.json",
                      merge_file="/cluster/tok/merges.txt")  # fmt: skip
    spec = teacher_spec(save)
    with pytest.raises(TeacherError, match=r"/cluster/tok/vocab.json.*--teacher-tokenizer"):
        tokenizer_from_args(spec)
    here = tmp_path / "tok"
    here.mkdir()
    with pytest.raises(TeacherError, match=str(here / "vocab.json")):
        tokenizer_from_args(spec, str(here))  # the override is looked in, by the recorded names


def test_build_cache_refuses_an_unusable_checkpoint_in_one_line_before_loading_it(tmp_path):
    save = _with_args(tmp_path, num_experts=4)
    prefix = write_dataset(tmp_path / "data", [[1, 2, 3, 200]] * 3)
    from megatron_slkd.data.describe import describe_data
    from megatron_slkd.data.tokenizers import NullTokenizer

    describe_data(prefix, NullTokenizer(200), progress=False, text_check=False)
    r = slkd("build-cache", "--data-prefix", prefix, "--teacher", save, "--output",
             tmp_path / "cache", "--context-length", "32", check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixture of experts" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_reading_the_arguments_runs_no_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    it = tmp_path / "iter_0000001"
    it.mkdir()
    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(num_layers=2, hook=_Boom()), "iteration": 1},
               buf, pickle_module=pickle)  # fmt: skip
    (it / "common.pt").write_bytes(buf.getvalue())
    args = read_args(it)
    assert args.num_layers == 2 and not (tmp_path / "PWNED").exists()


@needs_megatron_lm
@pytest.mark.parametrize("arch", list(_ARCH))
def test_checkpoints_this_megatron_lm_writes_give_its_logits(arch, tmp_path):
    """The fixtures' recipe, and more architectures, run with the Megatron-LM checkout."""
    shutil.copy(CHECKPOINTS / "llama" / "tokens.pt", tmp_path / "tokens.pt")
    r = subprocess.run([sys.executable, str(HARNESS), "save", "tokens.pt", "logits.pt",
                        *_COMMON, *_ARCH[arch]], cwd=tmp_path, capture_output=True, text=True,
                       env=megatron_lm_env(), timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    run_distributed(_logits_match, 2, [str(tmp_path)], tp=2, megatron=True)
