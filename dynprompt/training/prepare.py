"""From a task's data description to tokenised train and dev rows.

All data is read and checked here, before any model exists: a `DataError` names
the file, line and field. Tokenisation runs once per example, up front; batches
are collated from the stored rows. Reading and checking need neither torch nor a
backbone (both are imported when tokenising), so a bad file, or a run folder that
holds another run, is reported before seconds go into importing them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dynprompt.training.config import TaskData, TrainConfig
from dynprompt.training.data import (
    ColumnMapping,
    DataError,
    LabelledData,
    Layout,
    few_shot,
    load_preset,
    read_file,
)

if TYPE_CHECKING:
    import torch

    from dynprompt.models.backbone import Backbone, TokenizedRow


@dataclass
class TaskSplits:
    """One task's labelled data: what it trains on, what selects the best step during
    training (`select`), and what gives the final figure (`dev`)."""

    task: TaskData
    train: LabelledData
    select: LabelledData
    dev: LabelledData

    @property
    def name(self) -> str:
        assert self.task.name is not None
        return self.task.name

    @property
    def labels(self) -> list[str]:
        return self.train.labels

    def describe(self) -> str:
        """What the task trains on and is judged on, with sizes, for people."""
        t = self.task
        if t.preset:
            what = f"preset {t.preset}"
        else:
            what = f"file {t.train_file}" + (f", dev file {t.dev_file}" if t.dev_file else "")
        regime = {"full": "", "fewshot": f", {t.shots}-shot per class", "fewshot32": ", fewshot32"}[
            t.regime
        ]
        return f"{what}{regime}: train {len(self.train)}, dev {len(self.dev)}"

    def data_hash(self) -> str:
        """sha256 of exactly what the task trains and is judged on: the label names, then
        every train, selection and dev example (text, pair, label) in order. A resumed
        run must see the same examples; a checkpoint records which it saw."""
        digest = hashlib.sha256()

        def feed(value: object) -> None:
            digest.update(json.dumps(value, ensure_ascii=False).encode())
            digest.update(b"\n")

        feed(self.labels)
        for part in (self.train, self.select, self.dev):
            feed(len(part))
            for ex in part.examples:
                feed([ex.text, ex.text_pair, ex.label])
        return digest.hexdigest()

    def layout(self) -> Layout:
        """How the task's files hold their inputs: what a checkpoint stores so that
        `eval --file` and `predict` read the same kind of file with no flags."""
        t = self.task
        if t.preset is not None:
            return Layout.of_preset(t.preset)
        assert t.train_file is not None
        layout = Layout(
            text_field=t.text_field,
            pair_field=t.pair_field,
            label_field=t.label_field,
            has_header=t.has_header,
        )
        return layout.replace(format=layout.resolve_format(Path(t.train_file), t.format))


def subsample(data: LabelledData, limit: int | None, seed: int, what: str) -> LabelledData:
    """A seeded subset of at most `limit` examples, kept in file order."""
    if limit is None or len(data) <= limit:
        return data
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(data)), limit))
    return LabelledData(
        name=data.name,
        labels=list(data.labels),
        examples=[data.examples[i] for i in keep],
        source=f"{data.source} ({what}: {limit} of {len(data)}, seed={seed})",
    )


def _split_off(data: LabelledData, fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """Seeded stratified hold-out for a training file that comes without a dev file."""
    rng = random.Random(seed)
    dev_idx: set[int] = set()
    for c in range(len(data.labels)):
        idx = [i for i, ex in enumerate(data.examples) if ex.label == c]
        rng.shuffle(idx)
        dev_idx.update(idx[: max(1, round(len(idx) * fraction))] if idx else [])
    train = [ex for i, ex in enumerate(data.examples) if i not in dev_idx]
    dev = [ex for i, ex in enumerate(data.examples) if i in dev_idx]
    source = f"{data.source} (held-out {fraction:.0%}, seed={seed})"
    return (
        LabelledData(data.name, list(data.labels), train, data.source),
        LabelledData(data.name, list(data.labels), dev, source),
    )


def _check_split(data: LabelledData, field: str) -> None:
    present = {ex.label for ex in data.examples}
    if len(present) < 2:
        only = ", ".join(repr(data.labels[i]) for i in sorted(present)) or "none"
        raise DataError(
            f"{data.source}: field {field!r}: every example has class {only}; "
            "a split needs at least 2 classes",
            path=data.source,
            field=field,
        )


def load_task(
    task: TaskData, *, seed: int, eval_limit: int | None, final_limit: int | None
) -> TaskSplits:
    """Read, check and cut one task's data (no tokenisation: no backbone needed yet)."""
    if task.preset is not None:
        if task.regime == "fewshot32":
            train = load_preset(task.preset, "train", task.data_dir, regime="fewshot32")
            select = load_preset(task.preset, "dev", task.data_dir, regime="fewshot32")
            dev = load_preset(task.preset, "dev", task.data_dir, seed=task.split_seed)
        else:
            train = load_preset(task.preset, "train", task.data_dir, seed=task.split_seed)
            dev = load_preset(task.preset, "dev", task.data_dir, seed=task.split_seed)
            select = dev
    else:
        assert task.train_file is not None
        mapping = ColumnMapping(
            text=task.text_field,
            label=task.label_field,
            text_pair=task.pair_field,
            labels=task.labels,
        )
        train = read_file(task.train_file, mapping, task.format, task.has_header, name=task.name)
        if task.dev_file is not None:
            dev_mapping = ColumnMapping(
                text=task.text_field,
                label=task.label_field,
                text_pair=task.pair_field,
                labels=list(train.labels),
            )
            dev = read_file(
                task.dev_file, dev_mapping, task.format, task.has_header, name=task.name
            )
        else:
            train, dev = _split_off(train, task.dev_fraction, task.split_seed)
            _check_split(train, task.label_field)
            _check_split(dev, task.label_field)
        select = dev
    if task.regime == "fewshot":
        assert task.shots is not None
        train = few_shot(train, task.shots, seed)
    train = subsample(train, task.max_train_examples, seed, "training subset")
    _check_split(train, task.label_field)
    if select is dev:
        select = subsample(dev, eval_limit, 12345, "dev subset for model selection")
    dev = subsample(dev, final_limit, 54321, "dev subset")
    return TaskSplits(task=task, train=train, select=select, dev=dev)


def load_tasks(config: TrainConfig) -> list[TaskSplits]:
    """Every task of a run, all checked before anything is built."""
    splits = [
        load_task(
            t, seed=config.seed, eval_limit=config.eval_limit, final_limit=config.final_eval_limit
        )
        for t in config.task_list()
    ]
    for s in splits:
        if config.label_words is not None and len(config.label_words) != len(s.labels):
            raise DataError(
                f"label_words has {len(config.label_words)} words, task {s.name!r} has "
                f"{len(s.labels)} labels ({', '.join(s.labels)})",
                field="label_words",
            )
        if not s.select.examples or not s.dev.examples:
            raise DataError(f"{s.dev.source}: no dev examples", path=s.dev.source)
    return splits


@dataclass
class Rows:
    """Tokenised examples of one split and their labels."""

    rows: list[TokenizedRow]
    labels: torch.Tensor  # (N,) long

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        return [len(r.input_ids) for r in self.rows]


def tokenize(backbone: Backbone, data: LabelledData, max_length: int, truncation_side: str) -> Rows:
    """Every example tokenised in one batched call (what serving does, row for row)."""
    import torch

    rows = backbone.tokenize_rows(
        [ex.text for ex in data.examples],
        [ex.text_pair for ex in data.examples],
        max_length,
        truncation_side,
    )
    labels = torch.tensor([ex.label for ex in data.examples], dtype=torch.long)
    return Rows(rows, labels)
