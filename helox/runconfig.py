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
from typing import Any

from pydantic import Field, ValidationError

from services.runconfig import PipelineConfig, validate_sections
from shared.config import ConfigError, describe_validation_error, read_yaml
from shared.runs import canonical_json


class RunConfig(PipelineConfig):
    """A run config file, each section validated by its owner's model (see `load_run_config`):
    the pipeline's config (services.runconfig.PipelineConfig) plus what only `helox run` reads."""

    timeout_s: float = Field(default=1800.0, gt=0, description="`helox run` gives up after this long.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Deployment settings (HeloxSettings).")

    def pipeline_config(self) -> dict[str, Any]:
        """The run's config file (runs/<run_id>/config.json): everything but deployment settings."""
        return self.model_dump(mode="json", exclude={"settings", "timeout_s"})

    def config_hash(self) -> str:
        """SHA-256 of the config file's bytes (shared.runs.canonical_json)."""
        return hashlib.sha256(canonical_json(self.pipeline_config())).hexdigest()


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; ConfigError names every bad field and the file."""
    p = Path(path)
    data = read_yaml(p)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(p))) from exc
    validate_sections(cfg, str(p))  # InvalidRunConfigError (a ConfigError) names the section and field
    return cfg
