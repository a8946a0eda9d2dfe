"""The run configuration file (YAML): what `helox run CONFIG` asks the pipeline to do.

Top-level keys: `name`, `stages`, `timeout_s`, `settings` (deployment settings, see
shared.config.HeloxSettings) and one section per stage owner (`corpus`, `data`, `train`
(model included), `eval`, `export`). Each section is validated by the model of the code that owns
it, at start-up, so a bad value fails before anything runs, naming the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import ConfigError, describe_validation_error, read_yaml

Stage = Literal["data", "train", "eval", "export"]


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="demo", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stages: list[Stage] = Field(default_factory=lambda: ["data", "train", "eval", "export"], min_length=1)
    timeout_s: float = Field(default=1800.0, gt=0, description="`helox run` gives up after this long.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Deployment settings (HeloxSettings).")
    corpus: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)

    def pipeline_config(self) -> dict[str, Any]:
        """What travels in RunRequested.config: everything but deployment settings."""
        return self.model_dump(mode="json", exclude={"settings", "timeout_s"})

    def config_hash(self) -> str:
        canonical = json.dumps(self.pipeline_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _validate_sections(cfg: RunConfig) -> None:
    """Validate each section with the model of the code that owns it (normalising it)."""
    from shared.data.config import data_prep_config

    data = data_prep_config(cfg.corpus, cfg.data).model_dump(mode="json")
    cfg.corpus = data.pop("corpus")
    cfg.data = data
    try:
        from services.trainer.config import TrainConfig
    except ImportError:  # a build without the trainer
        return
    cfg.train = TrainConfig.model_validate(cfg.train).model_dump(mode="json")


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; ConfigError names every bad field and the file."""
    p = Path(path)
    data = read_yaml(p)
    try:
        cfg = RunConfig.model_validate(data)
        _validate_sections(cfg)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(p))) from exc
    return cfg
