"""The package's floors: which part may import which (read from the source, nothing run).

Low to high: errors; records, compat and the runtime and storage helpers; sampling and
the loss; the cache store; data; teachers; training; the command line on top. An import
of a higher floor is an upward import. ``UPWARD`` lists the ones that remain, each a
known debt with the reason it is there; the test fails on any other, and on any import
cycle between modules (imports under ``if TYPE_CHECKING:`` left out: they never run).
"""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_slkd"

FLOOR = {
    "errors": 0,
    "records": 1, "compat": 1, "storage": 1, "preempt": 1, "_sampling_cpu": 1,
    "urls": 2, "identity": 2, "ownership": 2, "liveness": 2, "launch": 2, "slurm": 2,
    "sampling": 2, "loss": 2, "gguf": 2,
    "cache": 3, "object_testing": 3,
    "publish": 4, "data": 4,
    "teacher": 5,
    "training": 6, "testing": 6,
    "cli": 7, "__main__": 8,
}  # fmt: skip

UPWARD = {
    # `python -m megatron_slkd.training` is a command-line entry point.
    ("training.__main__", "cli"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules) -> set[str]:
    """The package's modules ``name`` imports, anywhere but under ``if TYPE_CHECKING:``."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: max(0, len(package.split(".")) - child.level + 1)]
                    mod = ".".join(filter(None, [*base, child.module or ""]))
                    mod = f"megatron_slkd.{mod}" if mod else "megatron_slkd"
                else:
                    mod = child.module or ""
                targets = [f"{mod}.{a.name}" for a in child.names] + [mod]
            else:
                visit(child)
                continue
            for t in targets:
                if t.startswith("megatron_slkd."):
                    t = t[len("megatron_slkd.") :]
                    while t and t not in modules:
                        t = t.rpartition(".")[0]
                    # A module's own packages run before it whatever it imports.
                    if t and t != name and not name.startswith(t + "."):
                        found.add(t)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if name}


def _floor(module: str) -> int:
    return FLOOR[module.split(".")[0]]


def test_every_part_has_a_floor():
    tops = {m.split(".")[0] for m in _graph()}
    assert tops <= FLOOR.keys(), f"give these a floor in FLOOR: {sorted(tops - FLOOR.keys())}"


def test_no_upward_import_but_the_listed_ones():
    upward = {(a, b) for a, targets in _graph().items() for b in targets
              if _floor(b) > _floor(a)}  # fmt: skip
    assert upward <= UPWARD, f"upward imports: {sorted(upward - UPWARD)}"
    assert UPWARD <= upward, f"gone, take them off UPWARD: {sorted(UPWARD - upward)}"


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []
    cycles = []

    def walk(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state[n] == 1:
                cycles.append(path[path.index(n) :] + [n])
            elif state[n] == 0:
                walk(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            walk(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
