"""PNG plots of a run: learning curves, and the router's decisions on dev."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], span: int = 5) -> list[float]:
    out, acc = [], 0.0
    alpha = 2.0 / (span + 1)
    for i, v in enumerate(values):
        acc = v if i == 0 else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_learning_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Train loss and accuracy, dev metric per task, and the temperature, against steps."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in train], alpha=0.3, color="C0")
    ax.plot(steps, _smooth([r["loss"] for r in train]), color="C0", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("training loss")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, _smooth([r["accuracy"] for r in train]), color="C1", label="train accuracy")
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in evals:
        by_task[str(r.get("task"))].append(r)
    for i, (task, rows) in enumerate(sorted(by_task.items())):
        ax.plot(
            [r["step"] for r in rows],
            [r["accuracy"] for r in rows],
            marker="o",
            color=f"C{i + 2}",
            label=f"dev accuracy ({task})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy")
    ax.legend(fontsize="small")
    ax = axes[2]
    ax.plot(steps, [r["tau"] for r in train], color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("tau")
    ax.set_title("Gumbel-softmax temperature")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def routing_figure(histograms: dict[str, dict[str, dict[str, int]]], split: str) -> Any:
    """Bar charts of `tokens_before` and `prompt_length` per task, as a matplotlib figure.

    `histograms` maps task -> {"tokens_before": {value: count}, "prompt_length": {...}};
    `split` names what was counted (the y axis), e.g. "sst2 test examples (1821)".
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    tasks = sorted(histograms)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, key in enumerate(("tokens_before", "prompt_length")):
            ax = axes[row][col]
            counts = {int(k): int(v) for k, v in histograms[task].get(key, {}).items()}
            if counts:
                low = 0 if col == 0 else min(1, min(counts))
                xs = list(range(low, max(counts) + 1))
                ax.bar(xs, [counts.get(x, 0) for x in xs], color="C0" if col == 0 else "C2")
                ax.set_xlim(low - 0.6, max(counts) + 0.6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            label = "prompt tokens before the text" if col == 0 else "prompt length"
            ax.set_xlabel(label)
            ax.set_ylabel(split)
            ax.set_title(f"{task}: {label}")
    fig.tight_layout()
    return fig


def plot_routing(
    histograms: dict[str, dict[str, dict[str, int]]], path: Path, split: str = "dev examples"
) -> Path | None:
    """`routing_figure` written to `path` as a PNG."""
    if not histograms:
        return None
    fig = routing_figure(histograms, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_run(records: list[dict[str, Any]], directory: Path) -> list[Path]:
    """Both plots of a run from its metrics records; returns the files written."""
    finals = [r for r in records if r.get("type") == "final"]
    histograms = {
        str(r["task"]): {"tokens_before": r["tokens_before"], "prompt_length": r["prompt_length"]}
        for r in finals
    }
    sizes = sorted({int(r["n"]) for r in finals if "n" in r})
    split = f"dev ({sizes[0]} examples)" if len(sizes) == 1 else "dev examples"
    out = [
        plot_learning_curves(records, directory / "learning_curves.png"),
        plot_routing(histograms, directory / "routing.png", split),
    ]
    return [p for p in out if p is not None]
