"""The built-in corpus: docstrings of the Python standard library.

Real English prose and code commentary written by the CPython developers,
present on every machine with Python, so the demo and the tests need no
download. One document per module: its module, class and function docstrings
in source order. Modules are visited in sorted path order and parsed with
``ast`` (never imported), so the corpus is deterministic for a given Python.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BUILTIN_CORPORA", "stdlib_docstrings"]

_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_CHARS = 400


def _docstrings(tree: ast.Module) -> Iterator[str]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, nodes):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def stdlib_docstrings(max_documents: int | None = None) -> Iterator[str]:
    """Yield one document per standard-library module (at least 400 characters)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        text = "\n\n".join(_docstrings(tree))
        if len(text) < _MIN_CHARS:
            continue
        yield text
        count += 1
        if max_documents is not None and count >= max_documents:
            return


BUILTIN_CORPORA = {"stdlib-docstrings": stdlib_docstrings}
