"""Reading a run's evaluations back, and the reliability diagram of one or more runs."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["last_eval", "reliability_diagram"]


def last_eval(run_dir: str | Path) -> dict | None:
    """The last evaluation record of ``run_dir/train_log.jsonl`` (None if there is none)."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        return None
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "eval"]
    return evals[-1] if evals else None


def reliability_diagram(evals: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Accuracy against confidence per bin for each named evaluation, the diagonal
    for reference, ECE in the legend; bins without positions are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for name, ev in evals.items():
        pts = [(c, a, n) for c, a, n in zip(ev["bin_confidence"], ev["bin_accuracy"],
               ev["bin_count"], strict=True) if n]  # fmt: skip
        conf, acc, count = zip(*pts, strict=True) if pts else ((), (), ())
        total = sum(count) or 1
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {ev['ece']:.3f})")
        ax.scatter(conf, acc, s=[400 * n / total for n in count], alpha=0.25)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy of the top-1 token")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability diagram (marker area: share of positions)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
