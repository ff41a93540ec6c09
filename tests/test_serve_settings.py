"""Settings of `dynprompt serve`, read by pydantic-settings: every flag and variable it took
before the move still lands in its field; precedence flag > variable > file > default;
errors name their source; and the settings fail closed (unknown `DYNPROMPT_*` variables,
a reachable host without keys, key files, a missing repository), before anything heavy
loads. Also: the package makes Hugging Face offline before any hub import."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynprompt.models import Backbone
from dynprompt.service.config import (
    OTHER_PREFIXES,
    OTHER_VARIABLES,
    Settings,
    SettingsError,
    build_parser,
    env_name,
    flag_name,
    serve_variables,
    settings_from,
)
from tests.server_util import TEST_MODELS, build_repository, start_server

REPO = Path(__file__).resolve().parents[1]
FOLDER = "<a folder>"  # replaced by an existing folder (the repository must exist)

# Every option of `dynprompt serve --help` before the move to pydantic-settings (copied from
# that help): flag, variable, a value, the field it must land in and the value there.
SERVE_OPTIONS: list[tuple[str, str, str, str, Any]] = [
    ("--model-repository", "DYNPROMPT_MODEL_REPOSITORY", FOLDER, "model_repository", FOLDER),
    ("--poll-s", "DYNPROMPT_POLL_S", "2.5", "poll_s", 2.5),
    ("--host", "DYNPROMPT_HOST", "::1", "host", "::1"),
    ("--port", "DYNPROMPT_PORT", "9001", "port", 9001),
    ("--device", "DYNPROMPT_DEVICE", "cuda:1", "device", "cuda:1"),
    ("--dtype", "DYNPROMPT_DTYPE", "bfloat16", "dtype", "bfloat16"),
    ("--backend", "DYNPROMPT_BACKEND", "onnx", "backend", "onnx"),
    ("--onnx-cache-dir", "DYNPROMPT_ONNX_CACHE_DIR", "onnx/here", "onnx_cache_dir", Path("onnx/here")),
    ("--threads", "DYNPROMPT_THREADS", "3", "threads", 3),
    ("--workers", "DYNPROMPT_WORKERS", "4", "workers", 4),
    ("--tokenizer-threads", "DYNPROMPT_TOKENIZER_THREADS", "5", "tokenizer_threads", 5),
    ("--max-batch-size", "DYNPROMPT_MAX_BATCH_SIZE", "7", "max_batch_size", 7),
    ("--max-batch-tokens", "DYNPROMPT_MAX_BATCH_TOKENS", "999", "max_batch_tokens", 999),
    ("--max-wait-ms", "DYNPROMPT_MAX_WAIT_MS", "1.5", "max_wait_ms", 1.5),
    ("--padding-tolerance", "DYNPROMPT_PADDING_TOLERANCE", "0.5", "padding_tolerance", 0.5),
    ("--max-queue-requests", "DYNPROMPT_MAX_QUEUE_REQUESTS", "11", "max_queue_requests", 11),
    ("--queue-timeout-s", "DYNPROMPT_QUEUE_TIMEOUT_S", "12.5", "queue_timeout_s", 12.5),
    ("--max-client-batch-size", "DYNPROMPT_MAX_CLIENT_BATCH_SIZE", "13", "max_client_batch_size", 13),
    ("--payload-limit-bytes", "DYNPROMPT_PAYLOAD_LIMIT_BYTES", "4096", "payload_limit_bytes", 4096),
    ("--max-input-chars", "DYNPROMPT_MAX_INPUT_CHARS", "300", "max_input_chars", 300),
    ("--header-timeout-s", "DYNPROMPT_HEADER_TIMEOUT_S", "3.5", "header_timeout_s", 3.5),
    ("--keep-alive-timeout-s", "DYNPROMPT_KEEP_ALIVE_TIMEOUT_S", "6.5", "keep_alive_timeout_s", 6.5),
    ("--max-header-bytes", "DYNPROMPT_MAX_HEADER_BYTES", "2048", "max_header_bytes", 2048),
    ("--api-key", "DYNPROMPT_API_KEY", "key-1", "api_keys", ("key-1",)),
    ("--drain-timeout-s", "DYNPROMPT_DRAIN_TIMEOUT_S", "14", "drain_timeout_s", 14.0),
    ("--log-level", "DYNPROMPT_LOG_LEVEL", "warning", "log_level", "warning"),
    ("--log-format", "DYNPROMPT_LOG_FORMAT", "text", "log_format", "text"),
]  # fmt: skip
# Options added since (fail closed, the settings file, slow uploads and the connection cap).
NEW_FLAGS = {
    "--config",
    "--api-key-file",
    "--allow-unauthenticated",
    "--no-allow-unauthenticated",
    "--body-timeout-s",
    "--max-connections",
    "--padding-budget-tokens",
}
NEW_FIELDS = {
    "api_key_file",
    "allow_unauthenticated",
    "body_timeout_s",
    "max_connections",
    "padding_budget_tokens",
}


def _value(value: Any, folder: Path) -> Any:
    if value == FOLDER:
        return folder
    return value


@pytest.mark.parametrize(
    ("flag", "env", "given", "field", "want"), SERVE_OPTIONS, ids=[o[0] for o in SERVE_OPTIONS]
)
def test_every_old_flag_and_variable_lands_in_its_field(
    tmp_path: Path, flag: str, env: str, given: str, field: str, want: Any
) -> None:
    given = str(tmp_path) if given == FOLDER else given
    want = _value(want, tmp_path)
    default = Settings.model_fields[field].default
    assert want != default, "the example must differ from the default, or it proves nothing"
    by_flag = settings_from([flag, given], {})
    by_env = settings_from([], {env: given})
    assert getattr(by_flag, field) == want
    assert getattr(by_env, field) == want
    # And nothing else moved: the rest are the defaults.
    for other, info in Settings.model_fields.items():
        if other != field:
            assert getattr(by_flag, other) == info.default, other
            assert getattr(by_env, other) == info.default, other
    assert (flag_name(field), env_name(field)) == (flag, env)


def test_the_table_covers_every_option_of_help() -> None:
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    assert flags == {row[0] for row in SERVE_OPTIONS} | NEW_FLAGS
    assert set(Settings.model_fields) == {row[3] for row in SERVE_OPTIONS} | NEW_FIELDS
    assert serve_variables() == {row[1] for row in SERVE_OPTIONS} | {
        "DYNPROMPT_CONFIG",
        "DYNPROMPT_API_KEY_FILE",
        "DYNPROMPT_ALLOW_UNAUTHENTICATED",
        "DYNPROMPT_BODY_TIMEOUT_S",
        "DYNPROMPT_MAX_CONNECTIONS",
        "DYNPROMPT_PADDING_BUDGET_TOKENS",
    }


def test_api_keys_repeat_as_flags_and_split_on_commas_in_the_variable() -> None:
    assert settings_from(["--api-key", "a", "--api-key", "b"], {}).api_keys == ("a", "b")
    assert settings_from([], {"DYNPROMPT_API_KEY": " a, b ,,c "}).api_keys == ("a", "b", "c")
    # A flag replaces the variable, as for every other setting.
    both = settings_from(["--api-key", "f"], {"DYNPROMPT_API_KEY": "e1,e2"})
    assert both.api_keys == ("f",)


def test_empty_variables_count_as_unset_and_names_ignore_case() -> None:
    s = settings_from([], {"DYNPROMPT_THREADS": "", "DYNPROMPT_MAX_INPUT_CHARS": ""})
    assert s.threads is None and s.max_input_chars is None
    assert settings_from(["--host", ""], {}).host == "127.0.0.1"  # not "every interface"
    assert settings_from([], {"dynprompt_port": "9005"}).port == 9005


def test_allow_unauthenticated_flag_and_variable() -> None:
    assert settings_from(["--allow-unauthenticated"], {}).allow_unauthenticated is True
    s = settings_from(["--no-allow-unauthenticated"], {"DYNPROMPT_ALLOW_UNAUTHENTICATED": "1"})
    assert s.allow_unauthenticated is False
    assert settings_from([], {"DYNPROMPT_ALLOW_UNAUTHENTICATED": "true"}).allow_unauthenticated


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_flag_beats_variable_beats_file_beats_default(tmp_path: Path, suffix: str) -> None:
    config = tmp_path / f"serve{suffix}"
    if suffix == ".yaml":
        config.write_text("max_batch_size: 40\nport: 9040\nmax_wait_ms: 4.0\napi_keys: [filed]\n")
    else:
        config.write_text(
            'max_batch_size = 40\nport = 9040\nmax_wait_ms = 4.0\napi_keys = ["filed"]\n'
        )
    env = {"DYNPROMPT_MAX_BATCH_SIZE": "41", "DYNPROMPT_PORT": "9041"}
    s = settings_from(["--config", str(config), "--max-batch-size", "42"], env)
    assert s.max_batch_size == 42  # flag
    assert s.port == 9041  # variable over file
    assert s.max_wait_ms == 4.0  # file over default
    assert s.api_keys == ("filed",)
    assert s.queue_timeout_s == 30.0  # default
    # The file can also be named by its variable.
    by_env = settings_from([], {"DYNPROMPT_CONFIG": str(config)})
    assert (by_env.max_batch_size, by_env.port) == (40, 9040)


def test_errors_name_the_flag_variable_or_file(tmp_path: Path) -> None:
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--max-batch-size", "0"], {}, "--max-batch-size: "),
        ([], {"DYNPROMPT_MAX_WAIT_MS": "soon"}, "DYNPROMPT_MAX_WAIT_MS: "),
        (["--device", "tpu"], {}, "--device: device 'tpu'"),
        (["--dtype", "int8"], {}, "--dtype: "),
        (["--port", "not-a-port"], {}, "--port: "),
        ([], {"DYNPROMPT_ALLOW_UNAUTHENTICATED": "maybe"}, "DYNPROMPT_ALLOW_UNAUTHENTICATED: "),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_batch: 3\nport: nope\n")
    cases.append(
        (
            ["--config", str(bad)],
            {},
            f"{bad}: max_batch: unknown setting (did you mean max_batch_size?)",
        )
    )
    cases.append((["--config", str(bad)], {}, f"{bad}: port: "))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    cases.append((["--config", str(listed)], {}, f"--config {listed}: expected a mapping"))
    cases.append((["--config", str(tmp_path / "no.yaml")], {}, "no.yaml: file not found"))
    cases.append(
        ([], {"DYNPROMPT_CONFIG": str(tmp_path)}, f"DYNPROMPT_CONFIG {tmp_path}: not a file")
    )
    for argv, env, expected in cases:
        with pytest.raises(SettingsError) as caught:
            settings_from(argv, env)
        assert expected in str(caught.value), (argv, env, str(caught.value))
        assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- fail closed


def test_unknown_dynprompt_variable_names_the_closest_real_one() -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from([], {"DYNPROMPT_API_KEYS": "secret"})
    message = str(caught.value)
    assert "DYNPROMPT_API_KEYS (did you mean DYNPROMPT_API_KEY?)" in message
    assert "secret" not in message
    with pytest.raises(
        SettingsError, match=r"DYNPROMPT_MAX_BATCH \(did you mean DYNPROMPT_MAX_BATCH_SIZE\?\)"
    ):
        settings_from([], {"DYNPROMPT_MAX_BATCH": "3"})
    with pytest.raises(SettingsError) as caught:
        settings_from([], {"DYNPROMPT_QQQQQQ": "1"})
    assert "DYNPROMPT_QQQQQQ" in str(caught.value) and "did you mean" not in str(caught.value)
    # Variables of other commands and of the tests do not trip it; others' are untouched.
    fine = {name: "1" for name in OTHER_VARIABLES}
    fine.update({prefix + "MAX_STEPS": "1" for prefix in OTHER_PREFIXES})
    fine.update({"PATH": "/bin", "DYNPROMPTX": "1", "HF_HOME": "x"})
    assert settings_from([], fine).port == 8000


def _variables_named_in(path: Path) -> set[str]:
    """The `DYNPROMPT_*` names in a file; in a test, only on lines that read the environment
    (a test may pass a misspelt variable on purpose)."""
    lines = path.read_text(encoding="utf-8", errors="ignore").splitlines()
    if path.is_relative_to(REPO / "tests"):
        lines = [line for line in lines if re.search(r"environ|getenv|setenv", line)]
    return {m for line in lines for m in re.findall(r"\bDYNPROMPT_[A-Z0-9_]*[A-Z0-9]\b", line)}


def test_every_variable_the_project_reads_is_known_to_serve() -> None:
    """A variable read anywhere in the project (code, tests, deployment files) must not stop
    `serve`: it is one of serve's own or listed in OTHER_VARIABLES / OTHER_PREFIXES."""
    roots = [
        REPO / "dynprompt",
        REPO / "tests",
        REPO / "benchmarks",
        REPO / "deploy",
        REPO / "docker",
    ]
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]
    files += [REPO / "docker-compose.yml", REPO / ".ci" / "run"]
    files = [
        p
        for p in files
        if p.exists() and p != Path(__file__) and p.suffix not in {".safetensors", ".pyc", ".png"}
    ]
    named: dict[str, Path] = {}
    for path in files:
        for name in _variables_named_in(path):
            named.setdefault(name, path)
    assert "DYNPROMPT_DATA_DIR" in named and "DYNPROMPT_PORT" in named  # the scan found things
    known = serve_variables() | set(OTHER_VARIABLES)
    strays = {
        name: str(path.relative_to(REPO))
        for name, path in named.items()
        if name not in known and not any(name.startswith(p) for p in OTHER_PREFIXES)
    }
    assert not strays, f"add these to OTHER_VARIABLES in dynprompt/service/config.py: {strays}"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_a_reachable_host_needs_keys_or_an_explicit_flag(host: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from(["--host", host], {})
    message = str(caught.value)
    assert f"--host {host} " in message and "--allow-unauthenticated" in message
    assert "DYNPROMPT_API_KEY" in message and "--api-key-file" in message
    assert settings_from(["--host", host, "--allow-unauthenticated"], {}).host == host
    assert settings_from(["--host", host], {"DYNPROMPT_API_KEY": "k"}).api_keys == ("k",)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_keys(host: str) -> None:
    assert settings_from(["--host", host], {}).api_keys == ()


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_key_file_keys_join_the_other_keys(tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "keys", "# rotated 2024-05\n\nfile-1\n  file-2  \n#file-3\n")
    s = settings_from(["--api-key-file", str(keys), "--api-key", "flag-1"], {})
    assert s.api_keys == ("flag-1", "file-1", "file-2")
    s = settings_from([], {"DYNPROMPT_API_KEY_FILE": str(keys), "DYNPROMPT_API_KEY": "file-1"})
    assert s.api_keys == ("file-1", "file-2")  # once each
    # Keys from a file open a reachable host, and never show in the settings' text.
    s = settings_from(["--host", "0.0.0.0", "--api-key-file", str(keys)], {})
    assert "file-1" not in repr(s) and "file-1" not in str(s)
    assert "file-1" not in json.dumps(s.public_dict())
    # Group-readable is the operator's choice (a group of services); only "every user" is refused.
    _key_file(keys, "k\n", 0o640)
    assert settings_from(["--api-key-file", str(keys)], {}).api_keys == ("k",)


def test_unusable_key_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block: it must be refused unopened
    shared = "other users of this machine may read or change it"
    cases = {
        _key_file(tmp_path / "shared", "k\n", 0o644): shared,
        _key_file(tmp_path / "writable", "k\n", 0o602): shared,
        _key_file(tmp_path / "comments", "# none yet\n\n"): "holds no keys",
        _key_file(tmp_path / "big", "k" * 70_000 + "\n"): "not a key file",
        _key_file(tmp_path / "spaced", "secret key\n"): "line 1: a key has no spaces or commas",
        tmp_path / "missing": "file not found",
        fifo: "not a regular file",
        tmp_path: "not a regular file",
    }
    for path, expected in cases.items():
        with pytest.raises(SettingsError) as caught:
            settings_from(["--api-key-file", str(path)], {})
        assert str(caught.value).startswith(f"--api-key-file: {path}"), str(caught.value)
        assert expected in str(caught.value)
        assert "secret" not in str(caught.value)
    with pytest.raises(SettingsError, match=r"^DYNPROMPT_API_KEY_FILE: .*chmod 600"):
        settings_from([], {"DYNPROMPT_API_KEY_FILE": str(tmp_path / "shared")})
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644


def test_missing_repository_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(
        SettingsError, match=rf"^--model-repository {tmp_path}/x: folder not found$"
    ):
        settings_from(["--model-repository", str(tmp_path / "x")], {})
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(SettingsError, match=rf"^DYNPROMPT_MODEL_REPOSITORY={afile}: not a folder$"):
        settings_from([], {"DYNPROMPT_MODEL_REPOSITORY": str(afile)})


# --------------------------------------------------------------------------- the command


def _serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DYNPROMPT_")}
    return subprocess.run(
        [sys.executable, "-m", "dynprompt.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**base, **(env or {})},
    )


def test_start_up_mistakes_exit_2_with_one_line_before_binding(tmp_path: Path) -> None:
    """Each mistake is one line on stderr and exit 2, and the port is never bound: it is held
    here, so a server that got as far as binding would fail with 'address already in use'."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        missing = tmp_path / "x"
        cases = [
            (
                ["--model-repository", str(missing)],
                {},
                f"--model-repository {missing}: folder not found",
            ),
            (
                [],
                {"DYNPROMPT_API_KEYS": "k"},
                "DYNPROMPT_API_KEYS (did you mean DYNPROMPT_API_KEY?)",
            ),
            (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 is reachable from other machines"),
        ]
        for args, env, expected in cases:
            done = _serve([*args, "--port", port], env)
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("dynprompt serve: "), done.stderr
            assert expected in lines[0]
            assert "already in use" not in done.stderr


def test_help_and_settings_errors_load_neither_torch_nor_transformers() -> None:
    probe = (
        "import sys\n"
        "from dynprompt.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))\n"
    )
    for args in (["serve", "--help"], ["serve", "--max-batch-size", "0"]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", (args, done.stdout)


def test_help_documents_the_new_options() -> None:
    text = " ".join(build_parser().format_help().split())
    for flag, env in (
        ("--config", "DYNPROMPT_CONFIG"),
        ("--api-key-file", "DYNPROMPT_API_KEY_FILE"),
        ("--allow-unauthenticated", "DYNPROMPT_ALLOW_UNAUTHENTICATED"),
        ("--padding-budget-tokens", "DYNPROMPT_PADDING_BUDGET_TOKENS"),
    ):
        assert flag in text and f"[env {env}; default: " in text
    assert "shows in `ps`" in text
    assert "default: learned from the batches run]" in text
    assert settings_from(["--padding-budget-tokens", "300"], {}).padding_budget_tokens == 300
    assert settings_from([], {"DYNPROMPT_PADDING_BUDGET_TOKENS": "0"}).padding_budget_tokens == 0
    # No flag or variable is broken across lines (the Kubernetes test reads them from --help).
    raw = build_parser().format_help()
    assert not re.search(r"--[a-z-]*-\n", raw) and not re.search(r"DYNPROMPT_\n", raw)


@pytest.fixture(scope="module")
def key_file_server(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    repo = tmp_path_factory.mktemp("keys-models")
    build_repository(repo, minilm, {"pre": TEST_MODELS["pre"]})
    keys = _key_file(tmp_path_factory.mktemp("keys") / "keys", "# ops\nfrom-file\n")
    server = start_server(
        ["--model-repository", str(repo), "--api-key-file", str(keys), "--api-key", "from-flag"],
        log_dir=tmp_path_factory.mktemp("keys-logs"),
    )
    yield server
    assert server.stop() == 0, server.logs()[-3000:]


def test_a_real_server_requires_the_key_file_keys(key_file_server: Any) -> None:
    with httpx.Client(base_url=key_file_server.url, timeout=30) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401
        for key in ("from-file", "from-flag"):
            reply = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert reply.status_code == 200
            assert [m["name"] for m in reply.json()["models"]] == ["pre"]
    logs = key_file_server.logs()
    assert "show in `ps`" in logs  # the warning about --api-key
    assert "from-file" not in logs and "from-flag" not in logs


# --------------------------------------------------------------------------- offline


NETWORK_PROBE = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2])[:120])
    raise OSError("network blocked by the test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
import dynprompt
from dynprompt.models import load_backbone
import huggingface_hub.constants
try:
    load_backbone("bert-base-uncased")
    message = None
except Exception as exc:
    message = f"{type(exc).__name__}: {exc}"
print(json.dumps({"attempts": attempts, "message": message,
                  "hub_offline": huggingface_hub.constants.HF_HUB_OFFLINE}))
"""


def test_a_hub_named_backbone_makes_no_network_attempt(tmp_path: Path) -> None:
    """Importing dynprompt switches Hugging Face offline before huggingface_hub reads the
    switch, so a hub name fails at once, with its name, and without a DNS lookup."""
    switches = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    env = {k: v for k, v in os.environ.items() if k not in switches}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: the hub name cannot be found locally
    done = subprocess.run(
        [sys.executable, "-c", NETWORK_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert report["hub_offline"] is True
    assert report["message"] is not None and report["message"].startswith("BackboneError")
    assert "'bert-base-uncased'" in report["message"] and "no network is used" in report["message"]


def test_a_user_may_still_turn_the_hub_on() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    env.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", "import os, dynprompt; print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )  # fmt: skip
    assert done.stdout.split() == ["0", "1"], done.stderr


_POOL_SCRIPT = """
import os, sys
from dynprompt.models import load_backbone
from dynprompt.service.config import Settings
from dynprompt.service.server import prepare_threads

settings = {"threads": 1}
if sys.argv[1] != "default":
    settings["tokenizer_threads"] = int(sys.argv[1])
prepare_threads(Settings.model_validate(settings))
backbone = load_backbone("minilm")
backbone.tokenize_rows([f"a fine film about {i} people" for i in range(256)], None, 128)
print(len(os.listdir("/proc/self/task")))  # every thread of this process
"""


def test_tokenizer_threads_size_the_tokenizers_own_pool() -> None:
    """`--tokenizer-threads N`: the fast tokenizer tokenises batches on N threads (its
    Rust pool); unset, it keeps the library's default. Everything else in the process is
    the same, so its thread count differs by the pool's size alone."""

    def pool(value: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
        done = subprocess.run(
            [sys.executable, "-c", _POOL_SCRIPT, value],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return int(done.stdout.split()[-1])

    one = pool("1")
    assert pool("3") - one == 2
    assert pool("default") - one == len(os.sched_getaffinity(0)) - 1  # one per core
