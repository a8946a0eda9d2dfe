"""Services refuse to start on the committed development secrets (docker-compose.yml's default
Redis passwords and signing key) unless HELOX_ALLOW_DEV_SECRETS=1, so a production deploy
cannot run on them by accident."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts import SERVICE_NAMES
from shared.config import ConfigError, HeloxSettings
from shared.service import ALLOW_DEV_SECRETS, refuse_dev_secrets, run_service

from .conftest import REPO
from .test_compose import with_defaults


def settings(url: str | None = "redis://trainer:s3cret-Pw@redis:6379/0", key: str | None = None) -> HeloxSettings:
    return HeloxSettings(redis_url=url, signing_key=key)


def never_called(_rt: Any) -> None:
    raise AssertionError("setup ran: the service started")


def test_a_dev_password_stops_the_service_with_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for var in ("HELOX_CONFIG", "HELOX_SIGNING_KEY", ALLOW_DEV_SECRETS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HELOX_REDIS_URL", "redis://trainer:helox-dev-trainer@127.0.0.1:1/0")
    monkeypatch.setenv("HELOX_STATE_DIR", str(tmp_path))

    assert run_service("trainer", never_called) == 2

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("trainer: ") and "HELOX_REDIS_URL" in err and f"{ALLOW_DEV_SECRETS}=1" in err
    assert "helox-dev-trainer" not in err, "the message must not print the secret"


def test_the_dev_signing_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="HELOX_SIGNING_KEY"):
        refuse_dev_secrets(settings(key="helox-dev-signing-key"), environ={})


def test_both_are_named() -> None:
    with pytest.raises(ConfigError, match="HELOX_REDIS_URL and HELOX_SIGNING_KEY are"):
        refuse_dev_secrets(settings("redis://exporter:helox-dev-exporter@redis:6379/0", "helox-dev-signing-key"), {})


def test_a_percent_encoded_dev_password_is_still_one() -> None:
    with pytest.raises(ConfigError):
        refuse_dev_secrets(settings("redis://trainer:helox%2Ddev%2Dtrainer@redis:6379/0"), environ={})


@pytest.mark.parametrize("value", ["0", "", "true", "yes"])
def test_only_1_allows_them(value: str) -> None:
    with pytest.raises(ConfigError):
        refuse_dev_secrets(settings(key="helox-dev-signing-key"), environ={ALLOW_DEV_SECRETS: value})


def test_allowed_on_a_development_stack() -> None:
    dev = settings("redis://trainer:helox-dev-trainer@redis:6379/0", "helox-dev-signing-key")
    refuse_dev_secrets(dev, environ={ALLOW_DEV_SECRETS: "1"})


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("redis://trainer:s3cret-Pw@redis:6379/0", "a-real-key"),
        ("redis://127.0.0.1:6379/0", None),  # the local stack's embedded Redis: no password
        ("rediss://trainer:pw@redis:6380/0?ssl_ca_certs=/certs/ca.pem", None),
        ("unix:///run/redis.sock", None),
    ],
)
def test_real_or_no_secrets_start(url: str, key: str | None) -> None:
    refuse_dev_secrets(settings(url, key), environ={})


def test_every_compose_default_secret_is_refused_and_compose_does_not_allow_them_by_default() -> None:
    """The compose file's defaults are exactly what the check catches; allowing them is opt-in."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in SERVICE_NAMES:
        env = {k: with_defaults(str(v)) for k, v in compose["services"][name]["environment"].items()}
        assert env[ALLOW_DEV_SECRETS] != "1", f"{name}: compose must not allow the development secrets by default"
        dev = settings(env["HELOX_REDIS_URL"], env.get("HELOX_SIGNING_KEY"))
        with pytest.raises(ConfigError):
            refuse_dev_secrets(dev, environ={ALLOW_DEV_SECRETS: env[ALLOW_DEV_SECRETS]})


def test_the_development_env_file_allows_them() -> None:
    lines = [line.strip() for line in (REPO / ".env.example").read_text().splitlines()]
    assert f"{ALLOW_DEV_SECRETS}=1" in lines
