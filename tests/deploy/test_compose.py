"""docker-compose.yml and deploy/Dockerfile, checked without Docker: every service starts
a real module, has the settings it needs, the ACL users and passwords match the generated
ACL file, the evaluator scales, the artifact store is one shared volume; the cli, cyrex and
GPU-trainer services and the published-port override are wired as documented.
(`make test-deploy`, tests/deploy/compose_live.py, runs it all for real.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from contracts import SERVICE_NAMES
from contracts.services import SERVICES
from shared.config import HeloxSettings

from .conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
REDIS_PORT_OVERRIDE = REPO / "deploy" / "compose.redis-port.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
TORCH_PIN = "torch==2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TOOLS = {"cli": "tools", "cyrex": "cyrex", "trainer-gpu": "gpu", "objectstore": "s3"}
"""Services outside the default stack, and the profile each belongs to."""
NOT_SETTINGS = {"HELOX_ALLOW_DEV_SECRETS"}
"""HELOX_* variables that are read at start-up (shared.service), not HeloxSettings fields."""
# ${VAR:-default} / ${VAR-default}; anything else that starts with a single $ is refused.
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)(?P<default>[^}]*)\}")
ANY_DOLLAR = re.compile(r"(?<!\$)\$(?!\$)(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


def with_defaults(value: str) -> str:
    """Interpolate as compose would with none of the variables set."""
    return INTERPOLATION.sub(lambda m: m.group("default"), value)


def module_of(command: list[str] | str) -> str:
    """The module a `python -m <module>` command runs."""
    argv = command.split() if isinstance(command, str) else list(command)
    assert argv[:2] == ["python", "-m"] and len(argv) >= 3, f"not a `python -m <module>` command: {argv}"
    return argv[2]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in dockerfile_instructions() if op == "ARG" and "=" in rest)


def test_redis_and_the_five_services_exist_and_the_tools_wait_for_their_profiles(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", *SERVICE_NAMES, *TOOLS}
    for name, svc in compose["services"].items():
        assert svc.get("profiles") == ([TOOLS[name]] if name in TOOLS else None), name


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_each_service_runs_its_real_module(compose: dict[str, Any], name: str) -> None:
    svc = compose["services"][name]
    module = module_of(svc["command"])
    assert module == SERVICES[name].module
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__ (python -m)"
    build = svc["build"]
    assert build["dockerfile"] == "deploy/Dockerfile" and build["context"] == "."
    assert svc["image"] == compose["services"]["data-prep"]["image"], "one image for every service"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_each_service_has_the_settings_it_needs(compose: dict[str, Any], name: str, acl: ModuleType) -> None:
    env = {k: with_defaults(str(v)) for k, v in compose["services"][name]["environment"].items()}
    assert env.get("HELOX_ARTIFACTS") == "/artifacts"
    assert env.get("HELOX_LOG_FORMAT") == "json"
    assert env.get("HELOX_STATE_DIR")
    url = urlsplit(env["HELOX_REDIS_URL"])
    assert url.scheme in ("redis", "rediss") and url.hostname == "redis" and url.port == 6379
    # Its own ACL user, with the development password the committed users.acl holds.
    assert url.username == SERVICES[name].redis_user
    assert url.password == acl.dev_password(url.username)
    raw_url = str(compose["services"][name]["environment"]["HELOX_REDIS_URL"])
    assert f"${{{acl.password_env(name)}:-" in raw_url, f"password should come from {acl.password_env(name)}"
    if name == "exporter":
        assert env.get("HELOX_SIGNING_KEY")
    # Every HELOX_* variable is a real setting (extra="forbid" catches typos) and validates.
    fields = {k.removeprefix("HELOX_").lower(): v for k, v in env.items() if k.startswith("HELOX_") and k not in NOT_SETTINGS}
    HeloxSettings(**fields)


@pytest.mark.parametrize("path", [COMPOSE, REDIS_PORT_OVERRIDE], ids=lambda p: p.name)
def test_every_interpolation_has_a_default(path: Path) -> None:
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    bare = [m.group(0) for m in ANY_DOLLAR.finditer(text) if not INTERPOLATION.match(text, m.start())]
    assert not bare, f"interpolations without a default (use ${{VAR:-default}}): {bare}"
    assert INTERPOLATION.search(text)


def test_the_evaluator_scales(compose: dict[str, Any]) -> None:
    evaluator = compose["services"]["evaluator"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in evaluator, f"evaluator has {key}: `--scale evaluator=N` would conflict"
    assert "HELOX_INSTANCE" not in evaluator["environment"], "a fixed instance name would be shared by replicas"
    for name in SERVICE_NAMES:
        for port in compose["services"][name].get("ports", []):
            assert ":" not in str(port), f"{name} publishes a fixed host port {port}"


def test_one_artifacts_volume_mounted_everywhere(compose: dict[str, Any]) -> None:
    assert "artifacts" in compose["volumes"]
    for name in SERVICE_NAMES:
        mounts = [str(v) for v in compose["services"][name]["volumes"]]
        at_artifacts = [m for m in mounts if m.split(":")[1:2] == ["/artifacts"]]
        assert at_artifacts == ["artifacts:/artifacts"], f"{name}: {mounts}"
    assert "artifacts" not in str(compose["services"]["redis"].get("volumes", []))


def test_healthchecks(compose: dict[str, Any]) -> None:
    assert importlib.util.find_spec("shared.healthcheck") is not None
    for name in SERVICE_NAMES:
        hc = compose["services"][name]["healthcheck"]
        assert hc["test"] == ["CMD", "python", "-m", "shared.healthcheck", name]
        assert hc["interval"] and hc["retries"] >= 1
    redis_hc = compose["services"]["redis"]["healthcheck"]
    test = " ".join(redis_hc["test"])
    assert "redis-cli" in test and "--user admin" in test and "ping" in test
    auth = with_defaults(compose["services"]["redis"]["environment"]["REDISCLI_AUTH"])
    assert auth


def test_redis_has_aof_and_the_generated_acl_file(compose: dict[str, Any], acl: ModuleType) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7.2-alpine"
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    aclfile = cmd[cmd.index("--aclfile") + 1]
    mounts = {with_defaults(str(v)).rsplit(":", 2)[1]: with_defaults(str(v)).split(":")[0] for v in redis["volumes"]}
    assert aclfile in mounts, f"{aclfile} is not mounted into the redis container"
    source = (REPO / mounts[aclfile]).resolve()
    assert source == acl.ACL_FILE and source.exists()
    assert "requirepass" not in " ".join(cmd), "with an ACL file the passwords live there"
    assert "redis-data" in compose["volumes"]


def test_dockerfile_installs_pinned_torch_from_a_build_argument_first_then_the_project(compose: dict[str, Any]) -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    args = dockerfile_args()
    assert f"torch=={args['TORCH_VERSION']}" == TORCH_PIN
    assert args["TORCH_INDEX_URL"] == TORCH_INDEX, "the default torch is the CPU build"
    runs = [rest for op, rest in steps if op == "RUN" and "pip install" in rest]
    assert runs, "no pip install in the Dockerfile"
    first = runs[0]
    assert '"torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"' in first, f"first pip install must be torch: {first}"
    assert 'if [ -n "$TORCH_INDEX_URL" ]' in first, "an empty TORCH_INDEX_URL must fall back to pip's configuration"
    project = [i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r)]
    assert project and project[0] > 0, "the project (`pip install .`) is installed after torch"
    assert "--no-deps" in runs[project[0]], "the dependencies come from their own (cached) layer"
    # compose passes the torch source through, the CPU index by default.
    build_args = compose["services"]["trainer"]["build"]["args"]
    assert with_defaults(build_args["TORCH_INDEX_URL"]) == TORCH_INDEX
    assert "HELOX_TORCH_INDEX_URL-" in build_args["TORCH_INDEX_URL"], "an empty HELOX_TORCH_INDEX_URL must stay empty"
    ops = dict((op, rest) for op, rest in steps if op in ("WORKDIR", "USER"))
    assert ops.get("WORKDIR") == "/app"
    user = ops.get("USER", "root")
    assert user not in ("root", "0"), "the image must run as a non-root user"
    # The same pin as `make install`.
    assert f"TORCH  := {TORCH_PIN}" in (REPO / "Makefile").read_text()


def test_dockerignore_keeps_local_state_out() -> None:
    lines = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".helox", ".git", "**/__pycache__", ".pytest_cache"} <= lines


def test_the_image_gets_everything_it_runs() -> None:
    copied = {rest.split()[0] for op, rest in dockerfile_instructions() if op == "COPY"}
    for package in ("contracts", "shared", "services", "helox", "cyrex_example", "configs"):
        assert package in copied, f"the Dockerfile does not COPY {package}/"
    assert {"pyproject.toml", "README.md"} <= {p for op, rest in dockerfile_instructions() if op == "COPY" for p in rest.split()[:-1]}


def test_the_image_installs_the_extras_the_services_import(compose: dict[str, Any]) -> None:
    """transformers/onnx/onnxruntime/gguf (exporter, Cyrex) and sentence-transformers (data-prep,
    evaluator); llama-cpp-python is optional at run time (the exporter skips its GGUF check)."""
    import tomllib

    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    default = dockerfile_args()["HELOX_EXTRAS"].split(",")
    assert {"export", "semantic"} <= set(default) <= set(optional)
    assert "test" not in default
    for name in ("trainer", "trainer-gpu", "cli", "cyrex"):
        assert with_defaults(compose["services"][name]["build"]["args"]["HELOX_EXTRAS"]).split(",") == default
    gguf_export = (REPO / "services" / "exporter" / "gguf_export.py").read_text()
    assert 'find_spec("llama_cpp") is None' in gguf_export, "llama_cpp is no longer optional: add the llama extra"


def test_the_cli_service_runs_helox_as_the_cli_user(compose: dict[str, Any], acl: ModuleType) -> None:
    cli = compose["services"]["cli"]
    assert cli["image"] == compose["services"]["data-prep"]["image"]
    assert cli["command"][0] == "helox" and cli["restart"] == "no"
    env = {k: with_defaults(str(v)) for k, v in cli["environment"].items()}
    url = urlsplit(env["HELOX_REDIS_URL"])
    assert (url.username, url.password, url.hostname) == ("cli", acl.dev_password("cli"), "redis")
    assert "${HELOX_CLI_REDIS_PASSWORD:-" in str(cli["environment"]["HELOX_REDIS_URL"])
    assert env["HELOX_SIGNING_KEY"] == with_defaults(compose["services"]["exporter"]["environment"]["HELOX_SIGNING_KEY"])
    assert "artifacts:/artifacts" in cli["volumes"] and "./configs:/app/configs:ro" in cli["volumes"]
    assert (REPO / "configs" / "demo.yaml").exists()
    assert "docker compose run --rm cli helox run configs/demo.yaml" in (REPO / "README.md").read_text()


def test_the_cyrex_service_runs_the_reference_consumer_as_the_cyrex_user(compose: dict[str, Any], acl: ModuleType) -> None:
    import subprocess
    import sys

    cyrex = compose["services"]["cyrex"]
    argv = [str(a) for a in cyrex["command"]]
    assert module_of(argv) == "cyrex_example"
    env = {k: with_defaults(str(v)) for k, v in cyrex["environment"].items()}
    url = urlsplit(env["HELOX_REDIS_URL"])
    assert (url.username, url.password, url.hostname) == ("cyrex", acl.dev_password("cyrex"), "redis")
    assert env["HELOX_SIGNING_KEY"] == with_defaults(compose["services"]["exporter"]["environment"]["HELOX_SIGNING_KEY"])
    assert "artifacts:/artifacts:ro" in cyrex["volumes"]
    assert "--from-start" in argv, "a Cyrex started after the run must still see its ModelReady"
    # Every flag the service passes is one the consumer's CLI has.
    usage = subprocess.run([sys.executable, "-m", "cyrex_example", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=REPO, check=True).stdout
    for flag in (a for a in argv[3:] if a.startswith("--")):
        assert flag in usage, f"python -m cyrex_example has no {flag}"


def test_the_gpu_trainer_is_the_trainer_on_a_cuda_image_with_gpus_reserved(compose: dict[str, Any]) -> None:
    gpu, cpu = compose["services"]["trainer-gpu"], compose["services"]["trainer"]
    assert gpu["command"] == cpu["command"] and gpu["healthcheck"]["test"] == cpu["healthcheck"]["test"]
    assert gpu["environment"] == cpu["environment"]
    assert gpu["image"] != cpu["image"], "the CUDA image must not replace the CPU one"
    assert "whl/cu" in with_defaults(gpu["build"]["args"]["TORCH_INDEX_URL"])
    assert gpu["build"]["dockerfile"] == cpu["build"]["dockerfile"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    state = [v for v in gpu["volumes"] if v.endswith(":/state")]
    assert state and state != [v for v in cpu["volumes"] if v.endswith(":/state")], "one outbox volume per trainer"


def test_the_redis_port_override_publishes_redis_on_localhost_by_default() -> None:
    override = yaml.safe_load(REDIS_PORT_OVERRIDE.read_text())
    assert set(override["services"]) == {"redis"}
    (port,) = override["services"]["redis"]["ports"]
    bind, host_port, container_port = with_defaults(port).split(":")
    assert (bind, host_port, container_port) == ("127.0.0.1", "6379", "6379")
    assert "cyrex" in REDIS_PORT_OVERRIDE.read_text()
