"""The ``slkd`` command: one subcommand per pipeline step.

    slkd prepare-data  --input DOCS... --output-prefix PREFIX --train-sentencepiece 8000
    slkd describe-data PREFIX --tokenizer-type T --tokenizer-model M   (data prepared elsewhere)
    slkd convert-teacher --hf-model MODEL --output TEACHER_DIR   (megatron-core checkpoint)
    slkd build-cache   --data-prefix PREFIX --teacher MODEL --output CACHE --num-samples 50
    slkd merge-cache   SHARD_DIR... --output CACHE
    slkd verify-cache  CACHE --data-prefix PREFIX        (also under mpirun -n K)
    slkd inspect-cache CACHE [--doc D --offset O] [--plot hist.png]
    slkd thin-cache    CACHE --num-samples 12 --output CACHE12
    slkd remap-cache   CACHE... --data-prefix NEW --output OUT   (merged/re-ordered data)
    slkd train         --data-path PREFIX --kd-caches PREFIX=CACHE [--config student.yaml]

Errors in the inputs end the command with a one-line message and exit status 2.
SIGTERM or SIGUSR1 (Slurm's preemption and time-limit signals) end build-cache
and train at a resumable point with one line and exit status 75; SIGTERM ends
the other commands with their claims released and partial files removed, one
line and status 75 (rerun the same command).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from megatron_slkd.errors import SlkdError, as_reported, one_line

__all__ = ["main", "build_parser"]

_COMMANDS = {
    "prepare-data": "prepare_data",
    "describe-data": "describe_data",
    "convert-teacher": "convert_teacher",
    "build-cache": "build_cache",
    "merge-cache": "merge_cache",
    "verify-cache": "verify_cache",
    "inspect-cache": "inspect_cache",
    "thin-cache": "thin_cache",
    "remap-cache": "remap_cache",
    "train": "train",
}


def _module(name: str):
    import importlib

    return importlib.import_module(f"megatron_slkd.cli.{_COMMANDS[name]}")


def _docstring(name: str) -> str:
    """The module docstring of command ``name``, read without importing the module: build-cache
    and train import torch and megatron-core, seconds that ``slkd --help`` and the other
    commands need not spend."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(f"megatron_slkd.cli.{_COMMANDS[name]}")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text()), clean=False) or name


def build_parser(only: str | None = None, *, chosen: str | None = None) -> argparse.ArgumentParser:
    """The ``slkd`` parser (or, with ``only``, the parser of that one subcommand).

    With ``chosen``, only that subcommand's module is imported and given its arguments; the
    others keep their help line (enough for ``slkd --help`` and for an unknown command).
    """
    if only is not None:
        mod = _module(only)
        p = argparse.ArgumentParser(
            prog=f"slkd {only}",
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        return p
    parser = argparse.ArgumentParser(
        prog="slkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        mod = _module(name) if name == chosen else None
        doc = mod.__doc__ if mod is not None else _docstring(name)
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if mod is not None:
            mod.add_arguments(p)
    return parser


def seed(text: str) -> int:
    """The argparse type of a sampling seed: what the counter-based generator keys on (a
    negative one used to pass the parser and fail after the teacher had loaded)."""
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text}: a seed is an integer in [0, 2**64)")
    return value


def emit(result: dict, as_json: bool, human) -> None:
    """Print ``result`` as one JSON object, or through the ``human`` formatter."""
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        human(result)


# Commands that stop at a resumable point on SIGTERM / SIGUSR1 (exit status 75).
_PREEMPTIBLE = ("build-cache", "train")
# Options that may name a cache on object storage (s3://, msc://); any other URL is refused.
_OBJECT_URLS = {
    "verify-cache": {"--cache": "any"},
    "inspect-cache": {"--cache": "any"},
    "train": {"--kd-caches": "value"},
    "build-cache": {"--output": "any"},
    "merge-cache": {"--output": "any", "--inputs": "any"},
    "thin-cache": {"--output": "any", "--cache": "any"},
    "remap-cache": {"--output": "any", "--caches": "any", "--source-prefix": "key"},
}
# Inputs that are copied to a local directory first when they are on object storage.
_MIRRORED = {"merge-cache": "inputs", "thin-cache": "cache", "remap-cache": "caches"}


def _mirror_inputs(name: str, args) -> None:
    """Replace the command's object-storage inputs by local copies (publish.mirror)."""
    from megatron_slkd.storage import is_object_url

    attr = _MIRRORED.get(name)
    value = getattr(args, attr, None) if attr else None
    values = value if isinstance(value, list) else [value]
    if not any(is_object_url(v) for v in values):
        return
    from megatron_slkd.publish import mirror

    local = {v: str(mirror(v)) for v in values if is_object_url(v)}
    new = [local.get(v, v) for v in values]
    setattr(args, attr, new if isinstance(value, list) else new[0])
    if name == "remap-cache":  # --source-prefix CACHE=PREFIX names the cache as given
        pairs = [s.rsplit("=", 1) if "=" in s else [s, ""] for s in args.source_prefix]
        args.source_prefix = [f"{local.get(c, c)}={p}" for c, p in pairs]


# Commands whose --output may be on object storage: built locally, published (publish.py).
_PUBLISHING = ("build-cache", "merge-cache", "thin-cache", "remap-cache")


def _run(name: str, args) -> int:
    """Run the command; an output on object storage is staged locally and published."""
    from megatron_slkd.storage import is_object_url

    mod = _module(name)
    _mirror_inputs(name, args)
    url = getattr(args, "output", None)
    if name not in _PUBLISHING or not is_object_url(url):
        return int(mod.run(args) or 0)
    from megatron_slkd.launch import process_rank
    from megatron_slkd.publish import Publisher

    pub = Publisher(url, getattr(args, "staging_dir", None))
    publishes = process_rank()[0] == 0  # each array task publishes its own shards
    pub.pull()
    args.output = str(pub.staging)
    if publishes:
        pub.start()
    try:
        status = int(mod.run(args) or 0)
    finally:
        if publishes:  # what finished is published, also after a stop or an error
            pub.stop()
            done = pub.push()
            print(f"slkd {name}: published {len(done)} object(s) to {pub.describe()}",
                  file=sys.stderr)  # fmt: skip
    return status


def main(argv: list[str] | None = None, *, command: str | None = None) -> int:
    """Entry point of ``slkd`` (and, with ``command``, of one ``tools/*.py`` script)."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    # torch's CUDA build (the only one on PyPI for Python 3.12) says at import, on every
    # rank, that a machine without a GPU has no CUDA runtime: true, and no error.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    words = sys.argv[1:] if argv is None else argv
    chosen = words[0] if command is None and words and words[0] in _COMMANDS else None
    if (command or chosen) in _PREEMPTIBLE:
        # Before the command's module is imported (torch, megatron-core: seconds): Slurm's
        # signal may come while a requeued job is still starting, and must not kill it.
        from megatron_slkd.preempt import PreemptionWatch

        PreemptionWatch().install()
    parser = build_parser(command, chosen=chosen)
    args = parser.parse_args(argv)
    name = command or args.command
    try:
        from megatron_slkd.urls import refuse_urls

        refuse_urls({"--" + k.removeprefix("cfg__").replace("__", "-").replace("_", "-"): v
                     for k, v in vars(args).items()}, allow=_OBJECT_URLS.get(name))  # fmt: skip
        from megatron_slkd.compat.megatron import check_version

        check_version()  # a release no shim knows: one line now, not a traceback later
        if name in _PREEMPTIBLE:
            return _run(name, args)
        from megatron_slkd.preempt import stopped_by_sigterm

        with stopped_by_sigterm(name):
            return _run(name, args)
    except (SlkdError, OSError) as exc:
        where = [getattr(args, k, None) for k in ("output", "cfg__checkpoint__dir")]
        status, exc = as_reported(exc, next((w for w in where if w), None))
        kind = "stopped" if status != 2 else "error"
        # One write: the ranks of a job share its stderr, and print's two writes (text,
        # then newline) from two ranks can run their lines together.
        sys.stderr.write(f"slkd {name}: {kind}: {one_line(exc)}\n")
        sys.stderr.flush()
        return status
    finally:
        from megatron_slkd.launch import close_distributed

        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
