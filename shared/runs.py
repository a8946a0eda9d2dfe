"""A run's configuration as an artifact.

The validated run config is written once, when the run is requested, to
`runs/<run_id>/config.json` in the artifact store, as canonical JSON (so its SHA-256 is the
run's `config_hash`). Events carry its `ArtifactRef` (`run_config`): RunRequested ->
DatasetReady -> TrainingStarted / CheckpointSaved / TrainingCompleted -> EvaluationCompleted.
Each service reads the file from the reference of the event it handles, verified by digest,
and validates the section it owns; nobody scans a stream for the request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts import ArtifactRef, RunRequested
from shared.artifacts import ArtifactDigestError, ArtifactOutsideStoreError, ArtifactStore

CONFIG_FILE = "config.json"

DEFAULT_STAGES: list[str] = RunRequested.model_fields["stages"].get_default(call_default_factory=True)
"""The stages of a config that names none: those of a RunRequested that names none."""


class RunConfigError(ValueError):
    """A run config artifact that cannot be used; the message names the file or the run."""


class RunConfigMissingError(RunConfigError):
    """The referenced config file is not in this service's artifact store (absent, or outside it)."""


def canonical_json(config: dict[str, Any]) -> bytes:
    """The one byte form of a run config: sorted keys, no whitespace, no NaN."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise RunConfigError(f"the run config is not plain JSON (strings, numbers, lists, mappings): {exc}") from exc


def run_config_path(store: ArtifactStore, run_id: str) -> Path:
    """Where a run's config lives: runs/<run_id>/config.json."""
    if not run_id:
        raise RunConfigError("a run config needs a run id")
    return store.path("runs", run_id, CONFIG_FILE)


def write_run_config(store: ArtifactStore, run_id: str, config: dict[str, Any]) -> ArtifactRef:
    """Write a run's config (once) and return its reference.

    Writing the same config again returns the same reference (a redelivered request); a
    different config for a run id that already has one raises RunConfigError, since events
    already published may reference the first.
    """
    data = canonical_json(config)
    path = run_config_path(store, run_id)
    if path.exists():
        if path.read_bytes() != data:
            raise RunConfigError(
                f"{path} already holds a different configuration for run {run_id!r}: "
                "a run's config is written once; request the new config under a new run id"
            )
    else:
        store.atomic_write_bytes(path, data)
    return store.ref(path)


def read_run_config(store: ArtifactStore, ref: ArtifactRef) -> dict[str, Any]:
    """The run config a reference points to, verified against its SHA-256 and size.

    Raises RunConfigMissingError when the file is not in this store, RunConfigError when it
    does not match its reference or is not a JSON mapping.
    """
    try:
        data = store.read_verified(ref)
    except (FileNotFoundError, ArtifactOutsideStoreError) as exc:
        raise RunConfigMissingError(f"run config {ref.uri} is not in the artifact store {store.root}: {exc}") from exc
    except ArtifactDigestError as exc:
        raise RunConfigError(f"run config {ref.uri} does not match its reference: {exc}") from exc
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise RunConfigError(f"run config {ref.uri} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise RunConfigError(f"run config {ref.uri} must hold a JSON object, not {type(config).__name__}")
    return config


def request_config(request: RunRequested) -> dict[str, Any]:
    """The config file a RunRequested without `run_config` stands for: its inline config, with
    the request's name and stages (what downstream services read)."""
    return {**request.config, "name": request.name, "stages": list(request.stages)}


def section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of a run config (empty when absent)."""
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise RunConfigError(f"run config section {name!r} must be a mapping, not {type(value).__name__}")
    return value


def stages(config: dict[str, Any]) -> list[str]:
    """The pipeline stages a run config asks for."""
    value = config.get("stages", DEFAULT_STAGES)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RunConfigError(f"run config 'stages' must be a list of stage names, not {value!r}")
    return value
