"""The ``slkd`` command line: every command and flag explains itself, and a command imports
only what it needs (``slkd --help`` and the cache tools start without torch)."""

import subprocess
import sys

import pytest
from helpers import slkd_imports

from megatron_slkd.cli import _COMMANDS, build_parser


def _imports_after(argv: list[str]) -> set[str]:
    return slkd_imports(*argv, timeout=120)[1]


def test_help_lists_every_command_without_importing_torch():
    r = subprocess.run([sys.executable, "-m", "megatron_slkd", "--help"], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in _COMMANDS:
        assert f"    {name}" in r.stdout, name
    assert _imports_after(["--help"]) == set()


@pytest.mark.parametrize(
    "argv",
    [
        ["verify-cache", "/nonexistent/cache"],
        ["merge-cache", "/nonexistent/a", "--output", "/nonexistent/b"],
        ["inspect-cache", "/nonexistent/cache"],
    ],
)
def test_cache_tools_do_not_import_torch(argv):
    assert _imports_after(argv) == set()


@pytest.mark.parametrize("name", list(_COMMANDS))
def test_every_flag_has_help(name):
    full = build_parser(chosen=name)
    sub = next(a for a in full._actions if a.dest == "command").choices[name]
    assert sub.description and sub.description.strip()
    for action in sub._actions:
        assert action.help, f"slkd {name} {'/'.join(action.option_strings) or action.dest}"
    for flag in (s for a in sub._actions for s in a.option_strings if s.startswith("--")):
        assert flag == flag.lower() and "_" not in flag, f"slkd {name} {flag}: not kebab-case"


@pytest.mark.parametrize("model", ["no-such-org/no-model", "{tmp}/no-model-type"])
def test_a_library_message_is_reported_on_one_short_line(tmp_path, model):
    # A Hugging Face name not in the local cache: transformers' message runs over two lines
    # ("We couldn't connect ... Check your internet connection ..."); a directory whose
    # config.json names no model type: it lists some 400 model types (5 kB). A job log
    # shared by many ranks must get one readable line per error all the same.
    from helpers import write_dataset

    write_dataset(tmp_path / "corpus", [[5, 6, 7, 0]])
    (tmp_path / "no-model-type").mkdir()
    (tmp_path / "no-model-type" / "config.json").write_text("{}")
    model = model.format(tmp=tmp_path)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "megatron_slkd", "describe-data", str(tmp_path / "corpus"),
         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"slkd describe-data: error: {model}: cannot load"), lines[0]
    assert len(lines[0]) < 600 and lines[0].endswith("already in the Hugging Face cache")


@pytest.mark.parametrize("command", [["build-cache", "--data-prefix", "d", "--output", "o"],
                                     ["thin-cache", "c", "--num-samples", "2", "--output", "o"]])
def test_a_negative_seed_is_refused_by_the_parser(command):
    # It used to pass the parser and fail in the sampler, after build-cache had loaded the
    # teacher and opened a shard that then pinned the bad seed.
    r = subprocess.run([sys.executable, "-m", "megatron_slkd", *command, "--seed", "-5"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "a seed is an integer in [0, 2**64)" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["merge-cache", "{cache}", "--output", "{file}"],
        ["thin-cache", "{cache}", "--num-samples", "2", "--output", "{file}/sub"],
        ["train", "--data-path", "{tmp}/corpus", "--kd-ce-only", "--checkpoint-dir", "{file}/run"],
        ["prepare-data", "--input", "{text}", "--output-prefix", "{file}/corpus",
         "--train-sentencepiece", "100"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_output_directory_where_a_file_is(tmp_path, synthetic_cache, argv):
    # An --output naming a data file (DATA.bin) used to end in mkdir's "File exists (errno
    # 17); fix the storage, then rerun the same command": no storage fault, and the same
    # command failed again. (A process of its own: slkd train blocks SIGTERM and SIGUSR1
    # in its process for good, which every later subprocess of a test would inherit.)
    (tmp_path / "DATA.bin").write_bytes(b"not a directory")
    (tmp_path / "in.txt").write_text("one document\n")
    fill = {"cache": str(synthetic_cache.path), "tmp": str(tmp_path),
            "file": str(tmp_path / "DATA.bin"), "text": str(tmp_path / "in.txt")}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "megatron_slkd", *(a.format(**fill) for a in argv)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert f"error: {tmp_path / 'DATA.bin'}: a file, where the " in err, err
    assert "directory" in err and "errno" not in err, err
    assert (tmp_path / "DATA.bin").read_bytes() == b"not a directory"


@pytest.mark.parametrize("release", ["0.15.2", "0.20.0"])
def test_an_unsupported_megatron_core_is_one_line_before_anything_loads(tmp_path, release):
    # A megatron-core outside 0.16-0.19 first on the path (here a tree saying so, as a
    # Megatron-LM checkout on PYTHONPATH would): refused before torch or megatron loads.
    import os

    major, minor, patch = release.split(".")
    core = tmp_path / "tree" / "megatron" / "core"
    core.mkdir(parents=True)
    (core.parent / "__init__.py").write_text("")
    (core / "__init__.py").write_text("raise ImportError('never imported')\n")
    (core / "package_info.py").write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\n")
    code = ("import sys\nfrom megatron_slkd.cli import main\nstatus = main(sys.argv[1:])\n"
            "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))\n"
            "sys.exit(status)\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "tree")}
    for argv in (["train", "--data-path", "x", "--kd-ce-only"],
                 ["verify-cache", str(tmp_path / "c")]):  # fmt: skip
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"slkd {argv[0]}: error: megatron-core {release} is installed; megatron-slkd "
            "supports 0.16 to 0.19.x (Python 3.10-3.11: pip install 'megatron-core>=0.16,<0.17'; "
            "Python >= 3.12: pip install 'megatron-core>=0.16,<0.20')"
        ]
        loaded = r.stdout.strip().splitlines()[-1]
        assert loaded == ("['torch']" if argv[0] == "train" else "[]")  # megatron.core: never
