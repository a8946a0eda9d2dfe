"""docker-compose.yml and deploy/Dockerfile, checked without Docker: every service starts
a real module, has the settings it needs, the ACL users and passwords match the generated
ACL file, the evaluator scales, the artifact store is one shared volume."""

from __future__ import annotations

import importlib.util
import re
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
DOCKERFILE = REPO / "deploy" / "Dockerfile"
TORCH_PIN = "torch==2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
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


def test_redis_and_the_five_services_exist(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", *SERVICE_NAMES}


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
    fields = {k.removeprefix("HELOX_").lower(): v for k, v in env.items() if k.startswith("HELOX_")}
    assert len(fields) == len([k for k in env if k.startswith("HELOX_")])
    HeloxSettings(**fields)


def test_every_interpolation_has_a_default() -> None:
    text = COMPOSE.read_text()
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


def test_dockerfile_installs_pinned_cpu_torch_first_then_the_project() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [rest for op, rest in steps if op == "RUN" and "pip install" in rest]
    assert runs, "no pip install in the Dockerfile"
    assert TORCH_PIN in runs[0] and TORCH_INDEX in runs[0], f"first pip install must be the pinned CPU torch: {runs[0]}"
    project = [i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r)]
    assert project and project[0] > 0, "the project (`pip install .`) is installed after torch"
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
    for package in ("contracts", "shared", "services", "helox"):
        assert package in copied, f"the Dockerfile does not COPY {package}/"
    assert {"pyproject.toml", "README.md"} <= {p for op, rest in dockerfile_instructions() if op == "COPY" for p in rest.split()[:-1]}
