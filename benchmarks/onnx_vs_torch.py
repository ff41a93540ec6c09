"""ONNX Runtime over PyTorch eager, on the same inputs, side by side in one run.

    python -m benchmarks.onnx_vs_torch [--rows 256] [--batch 32] [--repeats 7] [--threads 2]
        [--torch-omp both]

Inputs are real SST-2 dev sentences in batches of `--batch`. Two workloads:
- `classify_rows` with a prompted `instance_position` model (20 prompt tokens,
  router on backbone features: two backbone passes per batch), end to end;
- the bare backbone forward over the same batches' prompt-free embeddings.

Both backends run interleaved in every repeat (torch, ONNX Runtime, torch, ...)
so that noise from other processes hits both alike; the table gives medians over
repeats. A sweep then varies ONNX Runtime's graph optimisation level and thread
count (torch at the same thread count) and reports whether any setting changes
the answer: the largest class-probability difference from torch fp32 and the
number of flipped labels or routing decisions. With a GPU (`--device cuda` or
`all`), the CUDA execution provider is measured too, in fp32 and fp16.

`--torch-omp both` repeats the main table in two subprocesses, with OpenMP's
default (spinning) wait policy for torch and with `OMP_WAIT_POLICY=PASSIVE`: on a
CPU shared with other work, spinning OpenMP threads slow torch down several-fold,
which is easily mistaken for an ONNX Runtime speed-up.
Writes the `onnx` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import device_description, write_section
from dynprompt.models import Backbone, DynPromptModel, classify_rows, load_backbone, make_config
from dynprompt.models.backbone import Encoded
from dynprompt.models.inference import RowResult
from dynprompt.models.onnx_backbone import GraphSpec, OnnxBackbone, OrtGraphs
from dynprompt.models.onnx_export import (
    DEFAULT_OPSET,
    cache_dir_for,
    export_backbone,
    load_onnx_backbone,
)

LEVELS = ("disable", "basic", "extended", "all")


def _sentences(rows: int) -> list[str]:
    from dynprompt.training.data import data_dir

    path = data_dir() / "sst2" / "dev.tsv"
    if not path.exists():
        raise SystemExit(f"needs the real data at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines][:rows]


def _model(backbone: Backbone, state: dict[str, torch.Tensor] | None = None) -> DynPromptModel:
    config = make_config(
        name="bench-ipos",
        variant="instance_position",
        backbone=backbone.spec(),
        labels=["negative", "positive"],
        prompt_length=20,
        feature="backbone",
    )
    torch.manual_seed(0)
    model = DynPromptModel(config, backbone)
    if state is None:
        assert model.routers.position is not None and model.head is not None
        torch.nn.init.normal_(model.routers.position.weight, std=0.5)  # decisions vary by row
        torch.nn.init.normal_(model.head.weight, std=0.5)
    else:
        model.load_state_dict(state)
    return model.eval()


@dataclass
class Workload:
    backbone: Backbone
    model: DynPromptModel
    batches: list[Encoded]
    embeds: list[torch.Tensor]

    @classmethod
    def build(
        cls, backbone: Backbone, model: DynPromptModel, texts: list[str], batch: int
    ) -> Workload:
        batches = [
            backbone.tokenize(texts[i : i + batch], max_length=128).to(backbone.device)
            for i in range(0, len(texts), batch)
        ]
        with torch.inference_mode():
            embeds = [backbone.embed(b.input_ids).clone() for b in batches]
        return cls(backbone, model, batches, embeds)

    def classify(self) -> list[RowResult]:
        out: list[RowResult] = []
        for encoded in self.batches:
            results, _ = classify_rows(
                self.backbone, [self.model] * len(encoded.truncated), encoded
            )
            out += results
        return out

    def forward(self, limit: int | None = None) -> None:
        """The bare backbone over the first `limit` batches (all by default)."""
        with torch.inference_mode():
            for encoded, embeds in list(zip(self.batches, self.embeds, strict=True))[:limit]:
                self.backbone.hidden_states(embeds, encoded.attention_mask, encoded.token_type_ids)

    @property
    def rows(self) -> int:
        return sum(len(b.truncated) for b in self.batches)


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns in every repeat."""
    for fn in fns.values():  # warm-up (allocators, ORT's first-run planning)
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def _compare(got: list[RowResult], want: list[RowResult]) -> tuple[float, int, int]:
    """Largest probability difference, flipped labels, changed routing decisions."""
    worst, flips, moved = 0.0, 0, 0
    for g, w in zip(got, want, strict=True):
        worst = max(worst, max(abs(a - b) for a, b in zip(g.probs, w.probs, strict=True)))
        flips += int(g.probs.index(max(g.probs)) != w.probs.index(max(w.probs)))
        moved += int((g.prompt_length, g.tokens_before) != (w.prompt_length, w.tokens_before))
    return worst, flips, moved


def _load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


def _device_run(args: argparse.Namespace, device: str, texts: list[str], cache: str) -> str:
    sync = _sync(device)
    threads = args.threads
    torch.set_num_threads(threads)
    dtypes = [torch.float32] + ([torch.float16] if device.startswith("cuda") else [])
    torch_bb = load_backbone(args.backbone, device)
    reference_model = _model(torch_bb)
    state = reference_model.state_dict()
    torch_work = Workload.build(torch_bb, reference_model, texts, args.batch)
    with torch.inference_mode():
        reference = torch_work.classify()
    lines = []
    headline = float("nan")
    rows = torch_work.rows
    load_before = _load_average()
    for dtype in dtypes:
        if dtype != torch.float32:
            torch_bb_d = load_backbone(args.backbone, device, dtype)
            torch_work_d = Workload.build(torch_bb_d, _model(torch_bb_d, state), texts, args.batch)
        else:
            torch_work_d = torch_work
        ort_bb = load_onnx_backbone(
            args.backbone,
            device,
            dtype,
            cache_dir=cache,
            intra_op_threads=threads,
            optimization_level=args.level,
        )
        ort_work = Workload.build(ort_bb, _model(ort_bb, state), texts, args.batch)
        times = _interleaved(
            {
                "torch classify": torch_work_d.classify,
                "ort classify": ort_work.classify,
                "torch forward": torch_work_d.forward,
                "ort forward": ort_work.forward,
            },
            args.repeats,
            sync,
        )
        with torch.inference_mode():
            diff, flips, moved = _compare(ort_work.classify(), reference)
            torch_diff, _, _ = _compare(torch_work_d.classify(), reference)
        name = str(dtype).replace("torch.", "")
        for what in ("classify", "forward"):
            t_torch = statistics.median(times[f"torch {what}"])
            t_ort = statistics.median(times[f"ort {what}"])
            paired = statistics.median(
                a / b for a, b in zip(times[f"torch {what}"], times[f"ort {what}"], strict=True)
            )
            label = (
                "`classify_rows`, instance_position (20-token prompt, backbone features)"
                if what == "classify"
                else "bare backbone forward (prompt-free batches)"
            )
            if what == "classify" and dtype == torch.float32:
                headline = t_torch / t_ort
            lines.append(
                f"| {device} {name} | {label} | {rows / t_torch:.1f} | {rows / t_ort:.1f} | "
                f"**{t_torch / t_ort:.2f}×** | {paired:.2f}× | "
                + (
                    f"{diff:.1e} ({flips} labels, {moved} routes changed)"
                    if what == "classify"
                    else ""
                )
                + (
                    f"; torch {name} itself: {torch_diff:.1e}"
                    if what == "classify" and dtype != torch.float32
                    else ""
                )
                + " |"
            )
        print("\n".join(lines[-2:]), flush=True)
        del ort_bb, ort_work
    table = (
        "| device, dtype | workload | torch eager sent/s | ONNX Runtime sent/s | ORT / torch "
        "(ratio of medians) | median of paired ratios | max abs prob diff vs torch fp32 |\n"
        "|---|---|---:|---:|---:|---:|---|\n" + "\n".join(lines)
    )
    sweep = (
        _sweep(args, device, texts, cache, reference, state)
        if args.sweep and not device.startswith("cuda")
        else ""
    )
    goal = (
        f"Goal ORT / torch ≥ 1.3× for `classify_rows` on {device} fp32: "
        f"**{'met' if headline >= 1.3 else 'not met'}** ({headline:.2f}×). "
        if not device.startswith("cuda")
        else ""
    )
    return (
        f"{table}\n\n{goal}Load average (1/5/15 min) before / after the main table: "
        f"{load_before} → {_load_average()} (2 cores; above 2 means other work competed).\n"
        f"{sweep}"
    )


def _quantized(ort_bb: Backbone, folder: Path, threads: int) -> Backbone:
    """The same backbone with its hidden-states graph quantised to int8 (dynamic, weights
    per tensor): a data point for what speed would cost in accuracy, not something served."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert isinstance(ort_bb, OnnxBackbone) and ort_bb.export_dir is not None
    runtime = ort_bb.ort
    target = folder / "hidden.int8.onnx"
    if not target.exists():
        quantize_dynamic(runtime.hidden_spec.path, target, weight_type=QuantType.QInt8)
    ort_bb.runtime = OrtGraphs(
        GraphSpec(target, runtime.hidden_spec.inputs, runtime.hidden_spec.output),
        None,
        hidden_size=runtime.hidden_size,
        vocab_size=None,
        dtype=runtime.dtype,
        device=runtime.device,
        intra_op_threads=threads,
        optimization_level="basic",
    )
    return ort_bb


def _sweep(
    args: argparse.Namespace,
    device: str,
    texts: list[str],
    cache: str,
    reference: list[RowResult],
    state: dict[str, torch.Tensor],
) -> str:
    """Graph (opset, optimisation level, int8) x thread count: speed of the bare forward,
    and whether the answer changes."""
    sweep_texts = texts[: args.sweep_rows]
    torch_bb = load_backbone(args.backbone, device)
    # Exports at other opsets go to their own cache roots (the cache key is the weights).
    roots = {DEFAULT_OPSET: cache}
    for opset in args.sweep_opsets:
        if opset != DEFAULT_OPSET:
            roots[opset] = f"{cache}-opset{opset}"
            folder = cache_dir_for(torch_bb.fingerprint, torch.float32, roots[opset])
            if not (folder / "manifest.json").exists():
                export_backbone(torch_bb, folder, opset=opset)
    rows_out = []
    for threads in args.sweep_threads:
        torch.set_num_threads(threads)
        torch_work = Workload.build(torch_bb, _model(torch_bb, state), sweep_texts, args.batch)
        n_batches = len(torch_work.batches)
        fns: dict[str, Callable[[], object]] = {"torch": torch_work.forward}
        works = {}
        for opset in args.sweep_opsets:
            levels = args.sweep_levels if opset == DEFAULT_OPSET else ["basic", "all"]
            for level in levels:
                ort_bb = load_onnx_backbone(
                    args.backbone,
                    device,
                    cache_dir=roots[opset],
                    intra_op_threads=threads,
                    optimization_level=level,
                )
                works[f"opset {opset}, `{level}`"] = Workload.build(
                    ort_bb, _model(ort_bb, state), texts, args.batch
                )
        if args.sweep_int8:
            ort_bb = load_onnx_backbone(args.backbone, device, cache_dir=cache)
            ort_bb = _quantized(ort_bb, Path(cache), threads)
            works[f"opset {DEFAULT_OPSET}, int8 weights (not served)"] = Workload.build(
                ort_bb, _model(ort_bb, state), texts, args.batch
            )
        for name, work in works.items():
            fns[name] = functools.partial(work.forward, n_batches)
        times = _interleaved(fns, args.sweep_repeats, _sync(device))
        t_torch = statistics.median(times["torch"])
        for name, work in works.items():
            with torch.inference_mode():
                diff, flips, moved = _compare(work.classify(), reference)
            t = statistics.median(times[name])
            rows_out.append(
                f"| {threads} | {name} | {t_torch * 1000 / n_batches:.0f} | "
                f"{t * 1000 / n_batches:.0f} | {t_torch / t:.2f}× | {diff:.1e} | {flips} | {moved} |"
            )
            print(rows_out[-1], flush=True)
    torch.set_num_threads(args.threads)
    return (
        "\nSettings sweep (bare forward over "
        f"{min(args.sweep_rows, len(texts))} sentences, medians of {args.sweep_repeats} "
        "interleaved repeats, torch at the same thread count; the answer is `classify_rows` "
        f"over all {len(texts)} sentences compared with torch fp32 at {args.threads} threads):\n\n"
        "| threads | ORT graph | torch ms / batch | ORT ms / batch | ORT / torch | "
        "max abs prob diff | labels flipped | routes changed |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows_out)
        + (
            "\n\nThe int8 row quantises the exported graph's weights (onnxruntime "
            "`quantize_dynamic`); it is not a setting of the server, and is shown for what speed "
            "would cost in answers.\n"
            if args.sweep_int8
            else "\n"
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--rows", type=int, default=256, help="SST-2 dev sentences")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--level", default="all", choices=LEVELS, help="ORT optimisation level")
    parser.add_argument(
        "--device",
        default="all",
        help="cpu, cuda, or all (the CPU, and the GPU when there is one)",
    )
    parser.add_argument("--sweep-levels", type=lambda s: s.split(","), default=list(LEVELS))
    parser.add_argument(
        "--sweep-threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2]
    )
    parser.add_argument(
        "--sweep-opsets",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[DEFAULT_OPSET, 23],
        help="opsets to export and compare (opset 23 has the fused ONNX Attention op)",
    )
    parser.add_argument(
        "--no-int8",
        dest="sweep_int8",
        action="store_false",
        help="leave out the int8-quantised graph from the sweep",
    )
    parser.add_argument("--sweep-rows", type=int, default=128)
    parser.add_argument("--sweep-repeats", type=int, default=5)
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="main table only")
    parser.add_argument("--cache-dir", help="ONNX export cache (default: a temporary folder)")
    parser.add_argument(
        "--torch-omp",
        choices=["inherit", "both"],
        default="inherit",
        help="inherit: one run in this environment; both: one run with OpenMP's default "
        "(spinning) wait policy and one with OMP_WAIT_POLICY=PASSIVE, each in a subprocess "
        "(the policy is read when torch starts), the sweep in the first only",
    )
    parser.add_argument("--body-out", help=argparse.SUPPRESS)  # a child's result file
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    import onnxruntime

    raw_argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.onnx_vs_torch " + shlex.join(raw_argv)
    texts = _sentences(args.rows)
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        cache = args.cache_dir or str(Path(tmp) / "cache")
        if args.torch_omp == "both":
            body = _policies(raw_argv, cache, Path(tmp))
        else:
            body = _run_devices(args, texts, cache)
    if args.body_out:
        Path(args.body_out).write_text(body)
        return 0
    providers = ", ".join(onnxruntime.get_available_providers())
    markdown = (
        "## ONNX Runtime over PyTorch eager\n\n"
        f"Command: `{command.strip()}`  \n"
        f"Device: {device_description()}; torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__} ({providers}); backbone MiniLM-L6, {len(texts)} SST-2 dev "
        f"sentences in batches of {args.batch}; {args.threads} threads for both; ORT graph "
        f"optimisation `{args.level}`, opset {DEFAULT_OPSET}; medians of {args.repeats} "
        "interleaved repeats.\n\n"
        f"{body}\n"
    )
    print(markdown)
    if not args.no_write:
        print("wrote", write_section("onnx", markdown))
    return 0


def _run_devices(args: argparse.Namespace, texts: list[str], cache: str) -> str:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    sections = []
    for device in devices:
        print(f"== {device}", flush=True)
        sections.append(_device_run(args, device, texts, cache))
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (default)")
    return f"torch's OpenMP wait policy (`OMP_WAIT_POLICY`): {policy}.\n\n" + "\n\n".join(sections)


def _policies(raw_argv: list[str], cache: str, tmp: Path) -> str:
    """The same measurement under both OpenMP wait policies, each in a fresh process."""
    base = [a for a in raw_argv if not a.startswith("--torch-omp")]
    if "--torch-omp" in raw_argv:  # "--torch-omp both" as two words
        at = raw_argv.index("--torch-omp")
        base = raw_argv[:at] + raw_argv[at + 2 :]
    bodies = []
    for i, (title, policy) in enumerate(
        [
            ("OpenMP default wait policy (threads spin)", None),
            ("OMP_WAIT_POLICY=PASSIVE (ONNX Runtime then does not spin either)", "PASSIVE"),
        ]
    ):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy is not None:
            env["OMP_WAIT_POLICY"] = policy
        out = tmp / f"body-{i}.md"
        child = [sys.executable, "-m", "benchmarks.onnx_vs_torch", *base, "--cache-dir", cache]
        child += ["--no-write", "--body-out", str(out)] + (["--no-sweep"] if i else [])
        print(f"== run with {title}", flush=True)
        subprocess.run(child, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
        bodies.append(f"### torch with {title}\n\n{out.read_text()}")
    return "\n\n".join(bodies)


if __name__ == "__main__":
    raise SystemExit(main())
