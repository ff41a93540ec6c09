"""`dynprompt bench NAME [options]`: run one benchmark script from a source checkout."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "assembly": ("benchmarks.assembly", "prompt assembly time over the backbone forward"),
    "serving": ("benchmarks.serving", "HTTP throughput, latency, batching gain, cost of dynamism"),
    "onnx": ("benchmarks.onnx_vs_torch", "ONNX Runtime over PyTorch eager"),
    "overhead": ("benchmarks.overhead", "the request path's CPU cost per request, compute aside"),
    "scheduler": ("benchmarks.scheduler", "what choosing a batch costs, by queue depth"),
    "batching": ("benchmarks.batching", "the model's CPU when the scheduler makes the batches"),
    "gpu": ("benchmarks.gpu", "CUDA: bare ceiling, batch pipeline and server (exits 0 on a CPU)"),
}


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in BENCHMARKS:
        lines = ["usage: dynprompt bench <name> [options]", "", "benchmarks:"]
        lines += [f"  {name:<10} {text}" for name, (_, text) in BENCHMARKS.items()]
        lines += [
            "",
            "Each writes its table under docs/; `dynprompt bench <name> --help` for options.",
        ]
        print("\n".join(lines))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
