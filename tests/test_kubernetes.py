"""The Kubernetes manifests (deploy/kubernetes/) against the Kubernetes schemas and the real server.

Nothing here talks to a cluster. Every object is validated offline by `kubernetes-validate`
(strict: unknown fields are errors) for the oldest and a recent Kubernetes release we claim; the
GPU overlay's patch is merged onto the base Deployment and validated too, and when `kubectl` is
installed its built-in kustomize renders both overlays and must agree with what is checked here.
Then every flag, variable, port, path and timeout the manifests name is checked against the
server itself: `dynprompt serve --help`, and a real server started with the Deployment's args and
the ConfigMap's and Secret's variables, whose probe and scrape paths must answer 200.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dynprompt.models import Backbone
from tests.deploy_util import (
    COMPOSE_FILE,
    DOCKERFILE_CPU,
    DOCKERFILE_GPU,
    dockerfile_env,
    dockerfile_server_command,
    final_stage,
)
from tests.server_util import TEST_MODELS, build_repository, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
BASE_DIR = K8S_DIR / "base"
GPU_DIR = K8S_DIR / "gpu"
# The oldest Kubernetes release the manifests claim to work on, and a recent one.
KUBERNETES_VERSIONS = ("1.28.0", "1.34.0")
# Set by the test helper itself (start_server binds a free loopback port; the test builds the
# model repository), so they are not taken from the manifest when starting the server.
HELPER_FLAGS = {"--host", "--port", "--model-repository"}

Doc = dict[str, Any]


# --------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> Doc:
    docs = load_docs(directory / "kustomization.yaml")
    assert len(docs) == 1 and docs[0]["kind"] == "Kustomization", directory
    return docs[0]


def base_objects() -> list[Doc]:
    """Every object the base kustomization lists, in its order."""
    out = []
    for name in kustomization(BASE_DIR)["resources"]:
        out.extend(load_docs(BASE_DIR / name))
    return out


def one(objects: list[Doc], kind: str) -> Doc:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def strategic_merge(base: Any, patch: Any) -> Any:
    """Enough of kubectl's strategic merge for the GPU patch: maps merge key by key, lists of
    named items (containers) merge by name, any other list or value is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


def gpu_deployment() -> Doc:
    overlay = kustomization(GPU_DIR)
    assert overlay["resources"] == ["../base"]
    patches = [load_docs(GPU_DIR / p["path"]) for p in overlay["patches"]]
    assert len(patches) == 1 and len(patches[0]) == 1
    patch = patches[0][0]
    assert patch["kind"] == "Deployment"
    deployment = one(base_objects(), "Deployment")
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    return strategic_merge(deployment, patch)


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def args_of(deployment: Doc) -> list[str]:
    return [str(a) for a in container(deployment).get("args", [])]


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs of the container args (every serve flag here takes a value)."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2], strict=True))


def named_port(deployment: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert port in ports, (port, ports)
    return int(ports[port])


def api_keys(objects: list[Doc]) -> list[str]:
    secret = one(objects, "Secret")
    raw = str(secret["stringData"]["DYNPROMPT_API_KEY"])
    return [k.strip() for k in raw.split(",") if k.strip()]


def server_env(objects: list[Doc]) -> dict[str, str]:
    """The variables envFrom gives the container: the ConfigMap's, then the Secret's."""
    env = {k: str(v) for k, v in one(objects, "ConfigMap")["data"].items()}
    env.update({k: str(v) for k, v in one(objects, "Secret")["stringData"].items()})
    return env


# --------------------------------------------------------------------------- the server's docs


class ServeHelp:
    """What `dynprompt serve --help` documents: its flags, variables and defaults."""

    def __init__(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "dynprompt.cli", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        text = done.stdout
        self.flat = " ".join(text.split())
        self.flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
        self.env = set(re.findall(r"\[env (DYNPROMPT_[A-Z0-9_]+);", self.flat))

    def default(self, env: str) -> str:
        found = re.search(rf"\[env {env}; default: ([^\]]*)\]", self.flat)
        assert found, f"{env} not documented with a default"
        return found.group(1)


@pytest.fixture(scope="module")
def serve_help() -> ServeHelp:
    help_ = ServeHelp()
    # The parse itself must have found something, or every check below passes vacuously.
    assert {"--port", "--drain-timeout-s"} <= help_.flags
    assert {"DYNPROMPT_PORT", "DYNPROMPT_API_KEY"} <= help_.env
    return help_


def setting(objects: list[Doc], help_: ServeHelp, flag: str) -> str:
    """A setting as the container gets it: its flag in the args wins, then envFrom, then the
    server's documented default."""
    deployment = one(objects, "Deployment")
    given = flag_values(args_of(deployment))
    if flag in given:
        return given[flag]
    env = "DYNPROMPT_" + flag.removeprefix("--").replace("-", "_").upper()
    return server_env(objects).get(env) or help_.default(env)


# --------------------------------------------------------------------------- layout and schemas


def test_kustomizations_list_every_manifest() -> None:
    base = kustomization(BASE_DIR)
    listed = set(base["resources"])
    on_disk = {p.name for p in BASE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kustomization(K8S_DIR)["resources"] == ["base"]
    assert {p["path"] for p in kustomization(GPU_DIR)["patches"]} == {
        p.name for p in GPU_DIR.glob("*.yaml") if p.name != "kustomization.yaml"
    }
    kinds = sorted(o["kind"] for o in base_objects())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed"
    )
    objects = [*base_objects(), gpu_deployment()]
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']} {where}: {exc.message}")
    assert not problems, problems
    # Strict validation really rejects what Kubernetes would: an unknown field fails.
    broken = yaml.safe_load(yaml.safe_dump(one(base_objects(), "Deployment")))
    container(broken)["readinesProbe"] = container(broken)["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


def by_kind(objects: list[Doc]) -> dict[tuple[str, str], Doc]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_kustomize_renders_what_is_validated() -> None:
    cpu = kustomize(K8S_DIR)
    assert by_kind(cpu) == by_kind(base_objects())
    gpu = by_kind(kustomize(GPU_DIR))
    want = by_kind(base_objects())
    want[("Deployment", "dynprompt")] = gpu_deployment()
    assert gpu == want


# --------------------------------------------------------------------------- against the images


def test_images_user_and_entrypoint_match_the_dockerfiles() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    cpu, gpu = one(base_objects(), "Deployment"), gpu_deployment()
    assert container(cpu)["image"] == compose["dynprompt"]["image"]
    assert container(gpu)["image"] == compose["dynprompt-gpu"]["image"]
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})
    for deployment, dockerfile in ((cpu, DOCKERFILE_CPU), (gpu, DOCKERFILE_GPU)):
        # No `command`: the image's ENTRYPOINT (`dynprompt serve`) runs, the args follow it.
        assert "command" not in container(deployment)
        assert dockerfile_server_command(dockerfile) == ["dynprompt", "serve"]
        users = [args for kw, args in final_stage(dockerfile) if kw == "USER"]
        uid, _, gid = users[-1].partition(":")
        pod = deployment["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == (uid, gid)
        # The root filesystem is read-only, so whatever the server writes must be a mount.
        security = container(deployment)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        writable = [
            m["mountPath"]
            for m in container(deployment)["volumeMounts"]
            if not m.get("readOnly", False)
        ]
        hf_home = dockerfile_env(dockerfile)["HF_HOME"]
        onnx_cache = "/home/dynprompt/.cache/dynprompt/onnx"  # ~/.cache of the image's user
        for path in (hf_home, onnx_cache):
            assert any(path.startswith(m.rstrip("/") + "/") for m in writable), (path, writable)


# --------------------------------------------------------------------------- against the server


def test_flags_and_variables_are_documented_by_the_server(serve_help: ServeHelp) -> None:
    objects = base_objects()
    deployment = one(objects, "Deployment")
    for flag in flag_values(args_of(deployment)):
        assert flag in serve_help.flags, f"{flag} is not a `dynprompt serve` flag"
    names = set(server_env(objects)) | {e["name"] for e in container(deployment).get("env", [])}
    assert names, "no DYNPROMPT_* settings found"
    for name in names:
        assert name in serve_help.env, f"{name} is not a variable `dynprompt serve` reads"
    refs = container(deployment)["envFrom"]
    assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == {
        one(objects, "ConfigMap")["metadata"]["name"]
    }
    assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} == {
        one(objects, "Secret")["metadata"]["name"]
    }


def test_ports_selectors_and_volumes_agree() -> None:
    objects = base_objects()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    flags = flag_values(args_of(deployment))
    port = int(flags["--port"])
    assert named_port(deployment, "http") == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert named_port(deployment, container(deployment)[probe]["httpGet"]["port"]) == port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    service = one(objects, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["name"] == "http"
    assert service["spec"]["type"] == "ClusterIP"
    assert named_port(deployment, service_port["targetPort"]) == port

    labels = pod["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), (selector, labels)
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (models,) = [n for n, m in mounts.items() if m["mountPath"] == flags["--model-repository"]]
    assert mounts[models]["readOnly"] is True
    claim = volumes[models]["persistentVolumeClaim"]["claimName"]
    assert claim == one(objects, "PersistentVolumeClaim")["metadata"]["name"]


def test_grace_period_outlasts_the_pre_stop_hook_and_the_drain(serve_help: ServeHelp) -> None:
    objects = base_objects()
    deployment = one(objects, "Deployment")
    drain = float(setting(objects, serve_help, "--drain-timeout-s"))
    queue_timeout = float(setting(objects, serve_help, "--queue-timeout-s"))
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The grace period counts from the preStop hook; SIGTERM comes after it.
    assert grace > pre_stop + drain, (grace, pre_stop, drain)
    # A request admitted just before SIGTERM may wait its whole queue timeout.
    assert drain >= queue_timeout, (drain, queue_timeout)


@pytest.fixture(scope="module")
def manifest_server(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    """A real server started as the Deployment starts it: its args (less those the helper sets)
    and the variables of the ConfigMap and Secret."""
    objects = base_objects()
    flags = flag_values(args_of(one(objects, "Deployment")))
    args = [
        item for flag, value in flags.items() if flag not in HELPER_FLAGS for item in (flag, value)
    ]
    repo = tmp_path_factory.mktemp("k8s-models")
    build_repository(repo, minilm, {"ipos": TEST_MODELS["ipos"]})
    server = start_server(
        [*args, "--model-repository", str(repo)],
        env=server_env(objects),
        log_dir=tmp_path_factory.mktemp("k8s-logs"),
    )
    yield server
    assert server.stop() == 0, server.logs()[-3000:]


def test_probes_and_scrape_path_answer_on_a_real_server(manifest_server: Any) -> None:
    objects = base_objects()
    deployment = one(objects, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    paths = {
        probe: container(deployment)[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths["readinessProbe"] == "/ready" and paths["livenessProbe"] == "/health"
    with httpx.Client(base_url=manifest_server.url, timeout=30) as client:
        for probe, path in paths.items():
            assert client.get(path).status_code == 200, probe
        scraped = client.get(annotations["prometheus.io/path"])
        assert scraped.status_code == 200
        # The HPA's Pods metric is a series this server exports.
        hpa = one(objects, "HorizontalPodAutoscaler")
        (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert re.search(rf"^{pods['metric']['name']} ", scraped.text, re.MULTILINE)
        # The Secret's comma-separated keys are each accepted, and required.
        assert client.get("/v1/models").status_code == 401
        keys = api_keys(objects)
        assert len(keys) >= 2
        for key in keys:
            r = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert [m["name"] for m in r.json()["models"]] == ["ipos"]
