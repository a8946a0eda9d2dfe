"""Deployment settings (one pydantic-settings model read from a YAML file and HELOX_* env),
and the strict base every configuration section derives from.

Precedence: explicit overrides > environment (HELOX_*) > YAML file (HELOX_CONFIG or the
path given) > defaults. An invalid value fails at start-up with ConfigError naming the
field and where it came from.
"""

from __future__ import annotations

import json
import os
import socket
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from contracts import DEFAULT_PREFIX

_CONFIG_PATH: ContextVar[str | None] = ContextVar("helox_config_path", default=None)
"""The YAML file given to load_settings(); HELOX_CONFIG when unset."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and its source."""


class StrictModel(BaseModel):
    """Base of every configuration section (run config, data, train, eval, health, export, model).

    Unknown keys are refused, so a typo fails validation naming the field instead of being
    ignored; defaults are validated like given values, so a default that breaks its own
    constraint fails too.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)


class FrozenStrictModel(StrictModel):
    """A StrictModel whose instances cannot change once validated (shared, hashable settings)."""

    model_config = ConfigDict(frozen=True)


class HeloxSettings(BaseSettings):
    """Settings shared by every Helox process (the bus, the store, logging)."""

    model_config = SettingsConfigDict(env_prefix="HELOX_", extra="forbid", validate_default=True)

    redis_url: str | None = Field(
        default=None,
        description="redis://[user:password@]host:port/db or rediss:// for TLS. "
        "Unset: `helox` starts an embedded redis-server.",
    )
    topic_prefix: str = Field(default=DEFAULT_PREFIX, description="Prefix of every stream name.")
    artifacts: Path = Field(
        default=Path(".helox/artifacts"),
        description="Artifact store root: a directory, or s3://bucket/prefix (shared/s3store.py; "
        "held as a Path, which shows it as s3:/bucket/prefix).",
    )
    state_dir: Path = Field(default=Path(".helox/state"), description="Local state: outbox files, embedded Redis data.")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for an s3:// artifact store (else AWS_ENDPOINT_URL or AWS's)."
    )
    s3_access_key_id: SecretStr | None = Field(default=None, description="S3 access key (else AWS_ACCESS_KEY_ID).")
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret key (else AWS_SECRET_ACCESS_KEY)."
    )
    s3_region: str | None = Field(default=None, description="S3 region (else AWS_REGION; default us-east-1).")
    instance: str | None = Field(default=None, description="Instance name; default host-pid... stable per process.")
    log_format: Literal["json", "console"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=300)
    reclaim_idle_ms: int = Field(
        default=15_000, ge=100, description="A pending entry idle this long is reclaimed by another instance."
    )
    keepalive_ms: int = Field(
        default=0, ge=0, description="How often a busy handler refreshes its claim (0: a third of reclaim_idle_ms)."
    )
    max_deliveries: int = Field(default=5, ge=1, le=1000, description="Deliveries before a failing message is dead-lettered.")
    polling_interval_ms: int = Field(default=100, ge=1, le=5000, description="Blocking read timeout.")
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)
    startup_wait_s: float = Field(default=60.0, ge=0, description="How long `helox run` waits for services to come up.")
    signing_key: SecretStr | None = Field(default=None, description="HMAC key for export signatures.")
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    corpus_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["{stdlib}", "."],
        min_length=1,
        description="Directories any run may read its corpus from ('{stdlib}' and '~' expand; relative to the "
        "data-prep service's working directory). A request's corpus.roots must lie inside them: it may narrow "
        "them, never widen them. Env: a JSON list or paths joined by ':'.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("corpus_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list of paths: {exc}") from exc
            return [p for p in text.split(os.pathsep) if p]
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a non-empty string without whitespace, e.g. 'helox.'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    def reclaim_keepalive_s(self) -> float:
        ms = self.keepalive_ms or max(self.reclaim_idle_ms // 3, 50)
        return ms / 1000.0

    def instance_name(self, service: str) -> str:
        """Stable per process: names that change on restart would orphan pending entries."""
        return self.instance or f"{service}-{socket.gethostname()}-{os.getpid()}"


class _YamlSource(PydanticBaseSettingsSource):
    """The `settings:` section (or the top level) of the YAML file named by HELOX_CONFIG."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _CONFIG_PATH.get() or os.environ.get("HELOX_CONFIG")
        if not path:
            return {}
        data = read_yaml(Path(path))
        section = data.get("settings", {}) if isinstance(data, dict) else {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: 'settings' must be a mapping")
        return section


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with errors that name the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def describe_validation_error(exc: ValidationError, source: str, env_prefix: str = "") -> str:
    """One line per bad field: 'field.path: message (input ...)'."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        hint = f" (env {env_prefix}{loc.upper()})" if env_prefix and "." not in loc else ""
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f"; got {value!r}"
        lines.append(f"  {loc}{hint}: {err.get('msg')}{shown}")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> HeloxSettings:
    """Load settings, raising ConfigError that names every bad field."""
    token = _CONFIG_PATH.set(str(config_path) if config_path is not None else None)
    try:
        return HeloxSettings(**overrides)
    except ValidationError as exc:
        source = f"settings (HELOX_* environment / 'settings:' of {config_path or os.environ.get('HELOX_CONFIG', 'no file')})"
        raise ConfigError(describe_validation_error(exc, source, "HELOX_")) from exc
    finally:
        _CONFIG_PATH.reset(token)
