"""The run configuration file (YAML): what `helox run CONFIG` asks the pipeline to do.

Top-level keys: `name`, `stages`, `timeout_s`, `settings` (deployment settings, see
shared.config.HeloxSettings) and one section per stage owner (`corpus`, `data`, `train`
(model included), `eval`, `health`, `export`). Each section is validated by the model of the
code that owns it, at start-up, so a bad value fails before anything runs, naming the field.
The validated config (`pipeline_config`) is what `helox run` writes to the artifact store as
runs/<run_id>/config.json (shared.runs.write_run_config); the services read it from there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from shared.config import ConfigError, StrictModel, describe_validation_error, read_yaml
from shared.runs import canonical_json

Stage = Literal["data", "train", "eval", "export"]


class RunConfig(StrictModel):
    """A run config file, each section validated by its owner's model (see `load_run_config`)."""

    name: str = Field(default="demo", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stages: list[Stage] = Field(default_factory=lambda: ["data", "train", "eval", "export"], min_length=1)
    timeout_s: float = Field(default=1800.0, gt=0, description="`helox run` gives up after this long.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Deployment settings (HeloxSettings).")
    corpus: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    health: dict[str, Any] = Field(
        default_factory=dict,
        description="This run's health-monitor thresholds, over the deployment's (HELOX_CONFIG `health:`).",
    )

    def pipeline_config(self) -> dict[str, Any]:
        """The run's config file (runs/<run_id>/config.json): everything but deployment settings."""
        return self.model_dump(mode="json", exclude={"settings", "timeout_s"})

    def config_hash(self) -> str:
        """SHA-256 of the config file's bytes (shared.runs.canonical_json)."""
        return hashlib.sha256(canonical_json(self.pipeline_config())).hexdigest()


def _validate_sections(cfg: RunConfig) -> None:
    """Validate each section with the model of the code that owns it (normalising it)."""
    from shared.data.config import data_prep_config

    data = data_prep_config(cfg.corpus, cfg.data).model_dump(mode="json")
    cfg.corpus = data.pop("corpus")
    cfg.data = data
    from services.evaluator.config import EvalConfig
    from services.health_monitor.config import HealthConfig
    from services.trainer.config import TrainConfig

    cfg.train = _section("train", TrainConfig, cfg.train)
    cfg.eval = _section("eval", EvalConfig, cfg.eval)
    # Validated, but kept as written: the monitor lays what the run sets over the deployment's
    # thresholds, so a normalised copy (every default spelled out) would hide those.
    _section("health", HealthConfig, cfg.health)
    try:
        from services.exporter.config import ExportConfig
    except ImportError:  # the exporter's logic is not in this build yet
        return
    cfg.export = _section("export", ExportConfig, cfg.export)


class _SectionError(ValueError):
    def __init__(self, name: str, exc: ValidationError) -> None:
        super().__init__(name)
        self.name, self.exc = name, exc


def _section(name: str, model: Any, value: dict[str, Any]) -> dict[str, Any]:
    """Validate a section; errors are reported with the section's name in the field path."""
    try:
        return model.model_validate(value).model_dump(mode="json")
    except ValidationError as exc:
        raise _SectionError(name, exc) from exc


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; ConfigError names every bad field and the file."""
    p = Path(path)
    data = read_yaml(p)
    try:
        cfg = RunConfig.model_validate(data)
        _validate_sections(cfg)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(p))) from exc
    except _SectionError as exc:
        msg = describe_validation_error(exc.exc, f"{p} [{exc.name}]")
        raise ConfigError(msg.replace("\n  ", f"\n  {exc.name}.")) from exc.exc
    return cfg
