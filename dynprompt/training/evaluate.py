"""Evaluation: accuracy, macro-F1, the confusion matrix and the router's decisions.

`evaluate_model` runs a model over tokenised rows in length-sorted batches with
inference-mode routing (argmax, no noise), so the numbers are those the server
would give; `format_report` turns the result into the table `dynprompt eval` prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from dynprompt.models.backbone import Backbone, TokenizedRow
from dynprompt.models.model import DynPromptModel, Output


@dataclass
class EvalResult:
    labels: list[str]
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]  # [true][predicted]
    tokens_before: dict[int, int] = field(default_factory=dict)  # value -> count
    prompt_length: dict[int, int] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list, repr=False)

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_json(self, with_predictions: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_before"] = {str(k): v for k, v in sorted(self.tokens_before.items())}
        out["prompt_length"] = {str(k): v for k, v in sorted(self.prompt_length.items())}
        if not with_predictions:
            out.pop("predictions")
        return out


def classification_metrics(
    gold: list[int], pred: list[int], labels: list[str]
) -> tuple[float, float, dict[str, dict[str, float]], list[list[int]]]:
    """Accuracy, macro-F1 (over classes present in gold or predictions, as scikit-learn
    does), per-class precision/recall/F1/support, and the confusion matrix [true][pred]."""
    n_cls = len(labels)
    confusion = [[0] * n_cls for _ in range(n_cls)]
    for g, p in zip(gold, pred, strict=True):
        confusion[g][p] += 1
    total = len(gold)
    correct = sum(confusion[i][i] for i in range(n_cls))
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(confusion[r][c] for r in range(n_cls))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": float(support),
        }
        if support or predicted:
            f1s.append(f1)
    accuracy = correct / total if total else 0.0
    macro_f1 = sum(f1s) / len(f1s) if f1s else 0.0
    return accuracy, macro_f1, per_class, confusion


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


ForwardFn = Callable[[list[int]], Output]


@torch.no_grad()
def evaluate_rows(
    forward: ForwardFn,
    n_rows: int,
    lengths: list[int],
    gold: Tensor,
    labels: list[str],
    batch_size: int,
) -> EvalResult:
    """Run `forward(row indices)` over every row in length-sorted batches and score it."""
    pred = [0] * n_rows
    before: Counter[int] = Counter()
    plen: Counter[int] = Counter()
    for batch in length_batches(lengths, batch_size):
        out = forward(batch)
        guesses = out.logits.argmax(dim=-1).tolist()
        for i, row in enumerate(batch):
            pred[row] = int(guesses[i])
        before.update(int(v) for v in out.routing.before.tolist())
        plen.update(int(v) for v in out.routing.length.tolist())
    gold_list = [int(v) for v in gold.tolist()]
    accuracy, macro_f1, per_class, confusion = classification_metrics(gold_list, pred, labels)
    return EvalResult(
        labels=list(labels),
        n=n_rows,
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class=per_class,
        confusion=confusion,
        tokens_before=dict(before),
        prompt_length=dict(plen),
        predictions=pred,
    )


def evaluate_model(
    model: DynPromptModel,
    rows: list[TokenizedRow],
    gold: Tensor,
    batch_size: int = 64,
    backbone: Backbone | None = None,
) -> EvalResult:
    """Evaluate one model on tokenised rows (inference routing)."""
    bb = backbone or model.backbone
    was_training = model.training
    model.eval()

    def forward(batch: list[int]) -> Output:
        encoded = bb.collate([rows[i] for i in batch], device=bb.device)
        out: Output = model(encoded)
        return out

    try:
        return evaluate_rows(
            forward, len(rows), [len(r.input_ids) for r in rows], gold, model.labels, batch_size
        )
    finally:
        model.train(was_training)


def _histogram_lines(title: str, counts: dict[int, int], width: int = 40) -> list[str]:
    if not counts:
        return []
    total = sum(counts.values())
    top = max(counts.values())
    lines = [title]
    for value in range(min(counts), max(counts) + 1):
        n = counts.get(value, 0)
        bar = "#" * (round(width * n / top) if top else 0)
        lines.append(f"  {value:>4}  {n:>6}  {100 * n / total:5.1f}%  {bar}")
    return lines


def format_report(result: EvalResult, title: str = "") -> str:
    """A plain-text report: headline metrics, per-class table, confusion matrix, routing."""
    lines = []
    if title:
        lines += [title, ""]
    lines.append(f"examples   {result.n}")
    lines.append(f"accuracy   {result.accuracy:.4f}")
    lines.append(f"macro-F1   {result.macro_f1:.4f}")
    lines.append("")
    w = max(8, *(len(x) for x in result.labels))
    lines.append(f"{'label':<{w}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for name in result.labels:
        s = result.per_class[name]
        lines.append(
            f"{name:<{w}}  {s['precision']:9.4f}  {s['recall']:6.4f}  {s['f1']:6.4f}  "
            f"{int(s['support']):7d}"
        )
    lines.append("")
    lines.append("confusion matrix (rows: true label, columns: predicted)")
    cw = max(6, *(len(x) for x in result.labels))
    lines.append(" " * (w + 2) + "  ".join(f"{x:>{cw}}" for x in result.labels))
    for name, row in zip(result.labels, result.confusion, strict=True):
        lines.append(f"{name:<{w}}  " + "  ".join(f"{v:>{cw}d}" for v in row))
    hist = _histogram_lines(
        "\nrouter: prompt tokens before the text (value, count, share)", result.tokens_before
    )
    if any(result.prompt_length):  # a linear probe has no prompt
        hist += _histogram_lines(
            "\nrouter: prompt length (value, count, share)", result.prompt_length
        )
    lines += hist
    return "\n".join(lines)
