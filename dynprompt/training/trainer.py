"""The training loop: prompt, routers and heads over a frozen backbone, via Accelerate.

One loop serves single-task and multitask runs (a single task is a list of one):
every task gets its own `DynPromptModel` (its own head), and in multitask runs
the models share one prompt bank and one set of routers, so each task still comes
out as its own self-contained, servable checkpoint.

Accelerate places the work on CPU or GPU, wraps the model for multi-GPU data
parallelism under `accelerate launch`, and handles mixed precision. Batch order
and Gumbel noise are pure functions of (seed, step), so a resumed run sees the
same stream it would have seen without the interruption; resume state is
safetensors + JSON, plus the optimizer's state (`torch.save`, loaded with
`weights_only=True`), never part of a checkpoint. A run folder is only continued
with the data and settings it was started with (`dynprompt.training.resume`),
checked before the backbone loads.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dynprompt.models.backbone import Backbone, load_backbone
from dynprompt.models.checkpoint import save_checkpoint
from dynprompt.models.config import VARIANT_DECISIONS, InputSpec, TrainingInfo, make_config
from dynprompt.models.model import DynPromptModel, Output
from dynprompt.models.pipeline import frozen_features
from dynprompt.models.routers import Routing
from dynprompt.training.config import ConfigError, TrainConfig, dump_config
from dynprompt.training.evaluate import EvalResult, evaluate_rows
from dynprompt.training.prepare import Rows, TaskSplits, load_tasks, tokenize
from dynprompt.training.progress import ProgressDisplay
from dynprompt.training.resume import (
    STATE_DIR,
    STATE_FILE,
    check_resume,
    data_record,
    settings_key,
)
from dynprompt.training.runtime import same_device

METRICS_FILE = "metrics.jsonl"

Logger = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- schedules


def temperature(step: int, config: TrainConfig) -> float:
    """Gumbel-softmax temperature at `step`: tau_start annealed to tau_min."""
    horizon = config.tau_anneal_steps or config.max_steps
    t = min(1.0, step / max(1, horizon))
    start, end = config.tau_start, config.tau_min
    if config.tau_schedule == "linear":
        return start + (end - start) * t
    if config.tau_schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    return max(end, start * (end / start) ** t)


# Our schedule names -> transformers' (`get_scheduler`).
LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@lru_cache(maxsize=32)
def _lr_schedule(name: str, warmup: int, total: int) -> Callable[[int], float]:
    from transformers import get_scheduler

    # get_scheduler wants an optimizer; its multiplier function is all that is used here.
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    multiplier: Callable[[int], float] = get_scheduler(
        LR_SCHEDULES[name], dummy, num_warmup_steps=warmup, num_training_steps=total
    ).lr_lambdas[0]
    return multiplier


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of every base learning rate at `step`: transformers' schedule of that
    name (linear warmup over `warmup_steps`, then constant, linear or cosine decay to 0
    at `max_steps`).

    During warmup, step `s` trains with the multiplier transformers gives step `s + 1`:
    transformers' step 0 has multiplier 0, a step that would train nothing. After it the
    two agree. These are the numbers dynprompt has always used (the shipped default
    model was trained with them; a test pins them step by step)."""
    warmup = config.warmup_steps
    # A run that is all warmup (max_steps <= warmup_steps) never decays: its schedule
    # ends past its last step.
    total = max(config.max_steps, warmup + 1)
    multiplier = _lr_schedule(config.lr_schedule, warmup, total)
    return float(multiplier(step + 1 if step < warmup else step))


# ----------------------------------------------------------------------------- batches


class BatchStream:
    """Endless batches of row indices; epoch `e`'s order is a function of (seed, e).

    With bucketing, each epoch's shuffled rows are cut into windows of 50 batches,
    sorted by length inside a window, batched, and the batches shuffled again, so a
    batch holds rows of similar length and little padding.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket: bool) -> None:
        self.lengths = lengths
        self.batch_size = min(batch_size, len(lengths))
        self.seed = seed
        self.bucket = bucket
        self.epoch = 0
        self._queue: list[list[int]] = []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bs = self.batch_size
        usable = len(order) - len(order) % bs  # drop the ragged tail: equal-size steps
        order = order[:usable]
        if self.bucket:
            window = bs * 50
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = [i for c in chunks for i in sorted(c, key=lambda r: self.lengths[r])]
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if not self._queue:
            self._queue = self._epoch_batches(self.epoch)
            self.epoch += 1
        return self._queue.pop(0)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self)


# ----------------------------------------------------------------------------- features


class FrozenFeatures:
    """Masked mean of the frozen backbone's last hidden states over the prompt-free
    input, computed once per row when first needed.

    This is exactly the router's `backbone` feature and the linear probe's pooled
    input, and with a frozen backbone it never changes, so training re-reads it
    instead of re-running the backbone every epoch.
    """

    def __init__(self, backbone: Backbone, rows: Rows) -> None:
        self.backbone = backbone
        self.rows = rows
        self.values = torch.zeros(len(rows), backbone.hidden_size, device=backbone.device)
        self.done = torch.zeros(len(rows), dtype=torch.bool)

    @torch.no_grad()
    def get(self, indices: list[int]) -> Tensor:
        missing = [i for i in indices if not self.done[i]]
        if missing:
            bb = self.backbone
            encoded = bb.collate([self.rows.rows[i] for i in missing], device=bb.device)
            index = torch.tensor(missing, device=bb.device)
            self.values[index] = frozen_features(bb, encoded, bb.embed(encoded.input_ids))
            self.done[missing] = True
        return self.values[torch.tensor(indices, device=self.values.device)]


def _uses_cache(config: TrainConfig) -> bool:
    """Whether the run reads frozen features (linear probe input, router features)."""
    if config.variant == "linear_probe":
        return config.pooling == "mean"
    dynamic = "instance" in VARIANT_DECISIONS[config.variant]
    return dynamic and config.feature == "backbone"


# ----------------------------------------------------------------------------- the module


class MultiTaskModule(nn.Module):
    """Every task's model in one module, so Accelerate wraps (and DDP syncs) one thing.
    Shared prompt and routers appear once in `parameters()`."""

    def __init__(self, models: dict[str, DynPromptModel]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)

    def output(
        self,
        task: str,
        encoded: Any,
        features: Tensor | None = None,
        tau: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Output:
        """Logits and routing of one task's model; `features` are cached frozen features
        (the linear probe's input, or the router's), used instead of a backbone pass."""
        model: DynPromptModel = self.models[task]  # type: ignore[assignment]
        if model.config.variant == "linear_probe" and features is not None:
            assert model.head is not None
            batch = features.shape[0]
            zeros = torch.zeros(batch, dtype=torch.long, device=features.device)
            return Output(model.head(features), Routing(zeros, zeros))
        # Cached router features, when given, replace a second backbone pass.
        out: Output = model(encoded, tau=tau, generator=generator, features=features)
        return out

    def forward(
        self,
        task: str,
        encoded: Any,
        features: Tensor | None = None,
        tau: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The training forward: logits only, a plain tensor for DDP to track."""
        return self.output(task, encoded, features, tau, generator).logits


@dataclass
class TaskState:
    splits: TaskSplits
    model: DynPromptModel
    train: Rows
    select: Rows
    dev: Rows
    caches: dict[str, FrozenFeatures] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.splits.name


@dataclass
class TrainResult:
    results: dict[str, EvalResult]  # task -> final dev evaluation
    best_step: int
    steps: int
    seconds: float
    checkpoints: dict[str, Path]
    history: list[dict[str, Any]]
    stopped_early: bool = False


# ----------------------------------------------------------------------------- set-up


def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is available")
    kwargs: dict[str, Any] = {"cpu": cpu, "mixed_precision": config.mixed_precision}
    if config.is_multitask:
        from accelerate.utils import DistributedDataParallelKwargs

        # A step trains one task's head; the other heads get no gradient.
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # Several runs in one process (tests, the experiment runner) with different
        # settings: Accelerate's state is a singleton, so start it afresh.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(True)
        return Accelerator(**kwargs)


def build_models(
    config: TrainConfig, splits: list[TaskSplits], backbone: Backbone
) -> dict[str, DynPromptModel]:
    if config.word_score == "mean" and backbone.family != "decoder":
        raise ConfigError(
            f"word_score 'mean' scores label words with a decoder-only language model; "
            f"backbone {config.backbone!r} is an {backbone.family.replace('_', '-')} model "
            f"(use word_score 'first')"
        )
    torch.manual_seed(config.seed)
    models: dict[str, DynPromptModel] = {}
    for s in splits:
        model_config = make_config(
            name=s.name,
            variant=config.variant,
            backbone=backbone.spec(),
            labels=s.labels,
            prompt_length=config.prompt_length,
            pool_size=config.pool_size,
            feature=config.feature,
            init=config.prompt_init,
            head_type=config.head,
            label_words=config.label_words,
            pooling=config.pooling,
            word_score=config.word_score,
            max_length=s.task.max_length or config.max_length,
            truncation_side=config.truncation_side,
        )
        # The layout of the training files, so that `eval --file` and `predict` read
        # files like them with no flags.
        layout = s.layout()
        spec = InputSpec(
            text_field=layout.text_field,
            pair_field=layout.pair_field,
            label_field=layout.label_field,
            format=layout.format,  # type: ignore[arg-type]
            has_header=layout.has_header,
            preset=layout.preset,
            max_length=model_config.input.max_length,
            truncation_side=model_config.input.truncation_side,
        )
        if model_config.head.word_score != config.word_score:
            raise ConfigError(
                f"word_score {config.word_score!r} scores label words; the {config.variant} "
                f"run has a {model_config.head.type} head (use head 'verbalizer')"
            )
        model_config = model_config.model_copy(update={"input": spec})
        models[s.name] = DynPromptModel(model_config, backbone)
    first = next(iter(models.values()))
    for model in list(models.values())[1:]:
        # Multitask: one prompt bank and one set of routers for every task.
        if first.prompt is not None:
            model.prompt = first.prompt
        model.routers = first.routers
    return models


def param_groups(module: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    groups: dict[str, list[nn.Parameter]] = {"prompt": [], "router": [], "head": [], "backbone": []}
    seen: set[int] = set()
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        leaf = name.split(".", 2)[-1]  # drop "models.<task>."
        if leaf == "prompt":
            groups["prompt"].append(param)
        elif leaf.startswith("routers."):
            groups["router"].append(param)
        elif leaf.startswith("head."):
            groups["head"].append(param)
        else:
            groups["backbone"].append(param)
    lrs = {
        "prompt": config.lr_prompt,
        "router": config.lr_router,
        "head": config.lr_head,
        "backbone": config.lr_backbone,
    }
    decay = {
        "prompt": 0.0,
        "router": 0.0,
        "head": config.weight_decay,
        "backbone": config.weight_decay,
    }
    return [
        {"params": ps, "lr": lrs[k], "base_lr": lrs[k], "weight_decay": decay[k], "group": k}
        for k, ps in groups.items()
        if ps
    ]


def make_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(module, config)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr_prompt)
    return torch.optim.AdamW(groups, lr=config.lr_prompt)


# ----------------------------------------------------------------------------- state


def _trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Every trainable tensor once (shared prompt/routers under their first name)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().to("cpu").clone().contiguous()
    return out


def _load_trainable(module: nn.Module, state: dict[str, Tensor]) -> None:
    current = module.state_dict(keep_vars=True)
    by_id: dict[int, str] = {}
    for name, tensor in current.items():
        by_id.setdefault(id(tensor), name)
    with torch.no_grad():
        for name, tensor in current.items():
            source = state.get(by_id[id(tensor)])
            if source is None:
                raise RuntimeError(f"resume state lacks tensor {name!r}")
            tensor.copy_(source.to(tensor.device, tensor.dtype))


@dataclass
class Progress:
    step: int = 0
    best_score: float = -1.0
    best_step: int = 0
    bad_evals: int = 0


def save_state(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    best: dict[str, Tensor] | None,
    config: TrainConfig,
    splits: list[TaskSplits],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "trainable.safetensors.tmp"
    save_file(_trainable_state(module), str(tmp))
    tmp.replace(directory / "trainable.safetensors")
    if best is not None:
        tmp = directory / "best.safetensors.tmp"
        save_file(best, str(tmp))
        tmp.replace(directory / "best.safetensors")
    tmp = directory / "optimizer.pt.tmp"
    torch.save(optimizer.state_dict(), tmp)
    tmp.replace(directory / "optimizer.pt")
    info = {
        **progress.__dict__,
        "config": settings_key(config),
        "data": data_record(splits),
        "has_best": best is not None,
    }
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(directory / STATE_FILE)


def load_state(
    directory: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    splits: list[TaskSplits],
) -> tuple[Progress, dict[str, Tensor] | None]:
    """The saved state, after `check_resume` has said it is this run's."""
    check_resume(directory, config, splits)
    info = json.loads((directory / STATE_FILE).read_text())
    info.pop("config")
    info.pop("data")
    _load_trainable(module, load_file(str(directory / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    best = load_file(str(directory / "best.safetensors")) if info.pop("has_best") else None
    return Progress(**info), best


# ----------------------------------------------------------------------------- the loop


def _batch_inputs(state: TaskState, split: str, batch: list[int]) -> tuple[Any, Tensor | None]:
    """Collated rows (unless the linear probe's cached features suffice) and cached features."""
    rows: Rows = getattr(state, split)
    bb = state.model.backbone
    cache = state.caches.get(split)
    features = cache.get(batch) if cache is not None else None
    encoded = None
    if not (features is not None and state.model.config.variant == "linear_probe"):
        encoded = bb.collate([rows.rows[i] for i in batch], device=bb.device)
    return encoded, features


def evaluate_task(
    module: MultiTaskModule, state: TaskState, split: str, batch_size: int
) -> EvalResult:
    rows: Rows = getattr(state, split)
    was_training = module.training
    module.eval()
    try:
        return evaluate_rows(
            lambda batch: module.output(state.name, *_batch_inputs(state, split, batch)),
            len(rows),
            rows.lengths,
            rows.labels,
            state.splits.labels,
            batch_size,
        )
    finally:
        module.train(was_training)


class MetricsLog:
    """`metrics.jsonl`: one JSON object a line, flushed as written (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if keep_until_step is not None and path.exists():
                # Resuming: drop what was logged after the saved state.
                kept = []
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("step", 0) <= keep_until_step and rec.get("type") != "final":
                        kept.append(rec)
                self.records = kept
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            else:
                path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    *,
    backbone: Backbone | None = None,
    splits: list[TaskSplits] | None = None,
    save: bool = True,
    log: Logger = _stderr,
    feature_store: dict[str, FrozenFeatures] | None = None,
) -> TrainResult:
    """Train per `config`; return final dev results (and write checkpoints if `save`).

    Data is loaded and checked first (a `DataError` before anything heavy happens).
    `backbone`/`splits` may be passed in by callers that reuse them across runs, and
    `feature_store` lets runs over the same splits share frozen features. The torch
    thread count is `num_threads` during the run and what it was afterwards.
    """
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(config, backbone, splits, save, log, feature_store)
    finally:
        torch.set_num_threads(threads)


def _train(
    config: TrainConfig,
    backbone: Backbone | None,
    splits: list[TaskSplits] | None,
    save: bool,
    log: Logger,
    feature_store: dict[str, FrozenFeatures] | None,
) -> TrainResult:
    started = time.time()
    if splits is None:
        splits = load_tasks(config)
    out_dir = Path(config.output_dir)
    state_dir = out_dir / STATE_DIR
    resuming = save and config.resume and (state_dir / STATE_FILE).exists()
    if resuming:
        check_resume(state_dir, config, splits)  # before anything heavy is loaded
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    info = log if main else (lambda _m: None)
    if backbone is None:
        info(f"loading backbone {config.backbone!r}")
        backbone = load_backbone(config.backbone, device=accelerator.device)
    elif not same_device(backbone.device, accelerator.device):
        raise RuntimeError(f"backbone is on {backbone.device}, the run on {accelerator.device}")

    models = build_models(config, splits, backbone)
    states: list[TaskState] = []
    use_cache = _uses_cache(config)
    for s in splits:
        model = models[s.name]
        max_length, side = model.config.input.max_length, model.config.input.truncation_side
        tick = time.time()
        task = TaskState(
            splits=s,
            model=model,
            train=tokenize(backbone, s.train, max_length, side),
            select=tokenize(backbone, s.select, max_length, side),
            dev=tokenize(backbone, s.dev, max_length, side),
        )
        if use_cache:
            store = feature_store if feature_store is not None else {}
            for split in ("train", "select", "dev"):
                key = f"{s.name}/{split}/{max_length}/{side}"
                if key not in store or store[key].backbone is not backbone:
                    store[key] = FrozenFeatures(backbone, getattr(task, split))
                task.caches[split] = store[key]
        states.append(task)
        info(f"task {s.name}: {s.describe()}; tokenised in {time.time() - tick:.1f}s")

    module = MultiTaskModule(models)
    optimizer = make_optimizer(module, config)
    wrapped, optimizer = accelerator.prepare(module, optimizer)

    progress = Progress()
    best: dict[str, Tensor] | None = None
    resumed = False
    if resuming:
        progress, best = load_state(state_dir, module, optimizer, config, splits)
        resumed = True
        info(f"resuming {out_dir} from step {progress.step} (same data and settings)")
        if progress.step >= config.max_steps:
            info(f"step {progress.step} reached max_steps {config.max_steps}: nothing to train")
    if save and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(config))
    metrics = MetricsLog(out_dir / METRICS_FILE, save and main, progress.step if resumed else None)

    n_tasks = len(states)
    streams = [
        BatchStream(
            st.train.lengths,
            config.batch_size,
            config.seed * 7919 + i * 104_729 + accelerator.process_index,
            config.bucket_by_length,
        )
        for i, st in enumerate(states)
    ]
    micro_done = progress.step * config.grad_accum
    for i, stream in enumerate(streams):
        # Micro-batch k trains task k % n_tasks: skip what the saved run already used.
        stream.skip(sum(1 for k in range(micro_done) if k % n_tasks == i))
    generator = torch.Generator(device=accelerator.device)
    save_every = config.save_every or config.eval_every

    bar = ProgressDisplay(
        desc="train",
        total=config.max_steps,
        initial=progress.step,
        unit="step",
        every=config.log_every,
        enabled=main and not config.quiet,
    )
    window: dict[str, float] = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "n": 0.0}
    stopped_early = False
    module.train()
    step = progress.step
    while step < config.max_steps:
        tau = temperature(step, config)
        factor = lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        for micro in range(config.grad_accum):
            k = step * config.grad_accum + micro
            task = states[k % n_tasks]
            batch = next(streams[k % n_tasks])
            generator.manual_seed(config.seed * 1_000_003 + k * 31 + accelerator.process_index)
            encoded, features = _batch_inputs(task, "train", batch)
            with accelerator.autocast():
                logits = wrapped(task.name, encoded, features, tau, generator)
            gold = task.train.labels[batch].to(logits.device)
            loss = F.cross_entropy(logits.float(), gold)
            accelerator.backward(loss / config.grad_accum)
            window["loss"] += float(loss.detach())
            window["correct"] += float((logits.argmax(-1) == gold).sum())
            window["seen"] += len(batch)
            window["n"] += 1
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(module.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.step = step

        if step % config.log_every == 0 or step == config.max_steps:
            record = {
                "type": "train",
                "step": step,
                "loss": window["loss"] / max(1.0, window["n"]),
                "accuracy": window["correct"] / max(1.0, window["seen"]),
                "tau": tau,
                "lr_prompt": config.lr_prompt * factor,
                "time": round(time.time() - started, 2),
            }
            metrics.write(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}", tau=f"{tau:.3f}"
            )
            window = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "n": 0.0}
        bar.update(1)

        if step % config.eval_every == 0 or step == config.max_steps:
            scores = []
            sizes = []
            for st in states:
                result = evaluate_task(module, st, "select", config.eval_batch_size)
                scores.append(result.metric(config.metric))
                sizes.append(result.n)
                metrics.write(
                    {
                        "type": "eval",
                        "step": step,
                        "task": st.name,
                        "accuracy": result.accuracy,
                        "macro_f1": result.macro_f1,
                        "n": result.n,
                    }
                )
            score = sum(scores) / len(scores)
            if score > progress.best_score:
                progress.best_score, progress.best_step, progress.bad_evals = score, step, 0
                if config.keep_best:
                    best = _trainable_state(module)
            else:
                progress.bad_evals += 1
            bar.set_postfix(dev=f"{score:.3f}")
            message = (
                f"step {step}/{config.max_steps}: dev {config.metric} {score:.4f} on "
                f"{'+'.join(map(str, sizes))} examples (best {progress.best_score:.4f} at "
                f"step {progress.best_step}), tau {tau:.3f}"
            )
            if not bar.write(message):
                info(message)
            if config.early_stopping is not None and progress.bad_evals >= config.early_stopping:
                stopped_early = True
        if save and main and (step % save_every == 0 or step == config.max_steps or stopped_early):
            save_state(state_dir, module, optimizer, progress, best, config, splits)
        if stopped_early:
            info(
                f"early stopping at step {step}: no improvement in {config.early_stopping} evaluations"
            )
            break
    bar.close()
    accelerator.wait_for_everyone()

    if config.keep_best and best is not None:
        _load_trainable(module, best)
    final_step = progress.best_step if config.keep_best and best is not None else step
    results: dict[str, EvalResult] = {}
    checkpoints: dict[str, Path] = {}
    for st in states:
        result = evaluate_task(module, st, "dev", config.eval_batch_size)
        results[st.name] = result
        metrics.write(
            {
                "type": "final",
                "step": final_step,
                "task": st.name,
                **result.to_json(),
            }
        )
        info(
            f"task {st.name}: dev accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f} "
            f"on {result.n} examples (weights of step {final_step})"
        )
        if save and main:
            path = config.checkpoints_root / st.name
            save_checkpoint(
                st.model, path, _training_info(config, st, result, final_step, step, states)
            )
            checkpoints[st.name] = path
            info(f"checkpoint: {path}")
    if save and main and config.plots:
        from dynprompt.training.plots import plot_run

        for path in plot_run(metrics.records, out_dir / "plots"):
            info(f"plot: {path}")
    return TrainResult(
        results=results,
        best_step=final_step,
        steps=step,
        seconds=time.time() - started,
        checkpoints=checkpoints,
        history=metrics.records,
        stopped_early=stopped_early,
    )


def _training_info(
    config: TrainConfig,
    state: TaskState,
    result: EvalResult,
    best_step: int,
    total_steps: int,
    states: list[TaskState],
) -> TrainingInfo:
    extra: dict[str, Any] = {
        "total_steps": total_steps,
        "batch_size": config.batch_size * config.grad_accum,
        "optimizer": config.optimizer,
        "learning_rates": {
            "prompt": config.lr_prompt,
            "router": config.lr_router,
            "head": config.lr_head,
        },
    }
    if len(states) > 1:
        extra["multitask_with"] = [s.name for s in states if s is not state]
    return TrainingInfo(
        data=state.splits.describe(),
        data_hash=state.splits.data_hash(),
        train_examples=len(state.train),
        dev_examples=result.n,
        steps=best_step,
        seed=config.seed,
        temperature={
            "start": config.tau_start,
            "min": config.tau_min,
            "schedule": config.tau_schedule,
            "anneal_steps": config.tau_anneal_steps or config.max_steps,
        },
        metrics={
            "dev_accuracy": round(result.accuracy, 6),
            "dev_macro_f1": round(result.macro_f1, 6),
            "dev_examples": result.n,
        },
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    )
