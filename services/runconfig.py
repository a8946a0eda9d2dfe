"""The whole run config, validated once, at the request, by the model of the code that owns
each section: `corpus`/`data` (shared.data.config), `train` (services.trainer.config, the model
preset included), `eval` (services.evaluator.config), `health` (services.health_monitor.config),
`export` (services.exporter.config).

Both requesters' gates use it: `helox run` (helox/runconfig.py) before it publishes, and
data-prep (the first consumer of every RunRequested) before any work, so a request from
outside the CLI is refused as early, naming the field. It is the one module that knows
every service's section model; those config modules import nothing of their service but
pydantic and shared/, and the import-linter contract lets this module (only) reach them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from shared.config import ConfigError, StrictModel, describe_validation_error

Stage = Literal["data", "train", "eval", "export"]

SECTION_NAMES = ("corpus", "data", "train", "eval", "health", "export")


class PipelineConfig(StrictModel):
    """The run config file (runs/<run_id>/config.json): name, stages and one mapping per section."""

    name: str = Field(default="demo", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stages: list[Stage] = Field(default_factory=lambda: ["data", "train", "eval", "export"], min_length=1)
    corpus: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    health: dict[str, Any] = Field(
        default_factory=dict,
        description="This run's health-monitor thresholds, over the deployment's (HELOX_CONFIG `health:`).",
    )


class InvalidRunConfigError(ConfigError):
    """A run config value is invalid; `fields` lists each bad field as `section.field.path`."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


def _fields(exc: ValidationError, section: str | None) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        out.append(".".join(p for p in (section, loc) if p) or "<root>")
    return out


def _error(exc: ValidationError, source: str, section: str | None) -> InvalidRunConfigError:
    where = f"{source} [{section}]" if section else source
    msg = describe_validation_error(exc, where)
    if section:  # every field path names its section: train.optim.lr, not optim.lr
        msg = msg.replace("\n  <root>:", f"\n  {section}:").replace("\n  ", f"\n  {section}.")
        msg = msg.replace(f"\n  {section}.{section}:", f"\n  {section}:")
    return InvalidRunConfigError(msg, _fields(exc, section))


def _section(name: str, model: type[BaseModel], value: dict[str, Any], source: str) -> dict[str, Any]:
    try:
        return model.model_validate(value).model_dump(mode="json")
    except ValidationError as exc:
        raise _error(exc, source, name) from exc


def validate_sections(config: PipelineConfig, source: str) -> None:
    """Validate each section with its owner's model, normalising it in place (every default
    spelled out), except `health`, which travels as written: the monitor lays what the run
    sets over the deployment's thresholds, and a normalised copy would hide those.

    Raises InvalidRunConfigError naming `source`, the section and each bad field.
    """
    from services.evaluator.config import EvalConfig
    from services.exporter.config import ExportConfig
    from services.health_monitor.config import HealthConfig
    from services.trainer.config import TrainConfig
    from shared.data.config import data_prep_config

    try:
        data = data_prep_config(config.corpus, config.data).model_dump(mode="json")
    except ValidationError as exc:
        # DataPrepConfig's paths are `corpus.…` for the corpus and the data section's own otherwise.
        fields = _fields(exc, None)
        named = [f if f.startswith("corpus") else f"data.{f}" for f in fields]
        head, *lines = describe_validation_error(exc, f"{source} [corpus/data]").split("\n  ")
        lines = [line if line.startswith("corpus") else f"data.{line}" for line in lines]
        raise InvalidRunConfigError("\n  ".join([head, *lines]), named) from exc
    config.corpus = data.pop("corpus")
    config.data = data
    config.train = _section("train", TrainConfig, config.train, source)
    config.eval = _section("eval", EvalConfig, config.eval, source)
    _section("health", HealthConfig, config.health, source)
    config.export = _section("export", ExportConfig, config.export, source)


def validate_run_config(config: dict[str, Any], source: str) -> PipelineConfig:
    """A run config file's content, every section validated (see `validate_sections`)."""
    try:
        checked = PipelineConfig.model_validate(config)
    except ValidationError as exc:
        raise _error(exc, source, None) from exc
    validate_sections(checked, source)
    return checked
