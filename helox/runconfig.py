"""The run configuration file (YAML): what `helox run CONFIG` asks the pipeline to do.

Top-level keys: `name`, `stages`, `timeout_s`, `settings` (deployment settings, see
shared.config.HeloxSettings) and one section per stage owner (`corpus`, `data`, `model`,
`train`, `eval`, `export`). Each section is validated by the model of the code that owns
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
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)

    def pipeline_config(self) -> dict[str, Any]:
        """What travels in RunRequested.config: everything but deployment settings."""
        return self.model_dump(mode="json", exclude={"settings", "timeout_s"})

    def config_hash(self) -> str:
        canonical = json.dumps(self.pipeline_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def section_validators() -> dict[str, Any]:
    """Section name -> pydantic model of the code that owns the section (where it exists)."""
    validators: dict[str, Any] = {}
    try:
        from shared.data.config import CorpusConfig, DataPrepConfig  # noqa: PLC0415

        validators["corpus"] = CorpusConfig
        validators["data"] = DataPrepConfig
    except ImportError:
        pass
    try:
        from shared.model.config import ModelConfig  # noqa: PLC0415

        validators["model"] = ModelConfig
    except ImportError:
        pass
    try:
        from services.trainer.config import TrainConfig  # noqa: PLC0415

        validators["train"] = TrainConfig
    except ImportError:
        pass
    return validators


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; ConfigError names every bad field and the file."""
    p = Path(path)
    data = read_yaml(p)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(p))) from exc
    for section, model in section_validators().items():
        value = getattr(cfg, section)
        if not value:  # empty: the owner applies its defaults (e.g. the demo corpus)
            continue
        try:
            validated = model.model_validate(value)
        except ValidationError as exc:
            msg = describe_validation_error(exc, f"{p} [{section}]")
            raise ConfigError(msg.replace("\n  ", f"\n  {section}.")) from exc
        setattr(cfg, section, validated.model_dump(mode="json"))
    return cfg
