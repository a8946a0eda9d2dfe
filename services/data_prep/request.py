"""The request gate: a RunRequested's whole run config checked before any work.

data-prep is the first consumer of every request, so it is where a request from anyone (the
CLI, an API, a script) is refused: every section by its owner's model
(services.runconfig.validate_run_config, the model preset included), then the corpus roots
against the deployment's (`HELOX_CORPUS_ROOTS`): a request may narrow what data-prep reads,
never widen it. Each refusal names the field (`section.field`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.runconfig import InvalidRunConfigError, validate_run_config
from shared.data.config import DataPrepConfig, data_prep_config

from .ingest import expand_path


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def confine_roots(config: DataPrepConfig, deployment_roots: list[str], base_dir: Path) -> None:
    """Refuse corpus roots outside the deployment's (symlinks resolved), naming `corpus.roots.<i>`."""
    allowed = [expand_path(r, base_dir).resolve() for r in deployment_roots]
    bad, lines = [], []
    for i, root in enumerate(config.corpus.roots):
        resolved = expand_path(root, base_dir).resolve()
        if not _inside(resolved, allowed):
            bad.append(f"corpus.roots.{i}")
            lines.append(f"  corpus.roots.{i}: {root!r} ({resolved}) is outside the deployment's corpus roots")
    if bad:
        raise InvalidRunConfigError(
            "invalid run config: corpus roots outside the deployment's "
            f"{[str(r) for r in allowed]} (HELOX_CORPUS_ROOTS): a request may narrow them, not widen them\n"
            + "\n".join(lines),
            bad,
        )


def checked_request(config: dict[str, Any], source: str, deployment_roots: list[str],
                    base_dir: Path | None = None) -> DataPrepConfig:
    """The run config's data-prep sections, once the whole config passed the gate.

    Raises InvalidRunConfigError naming each bad field.
    """
    checked = validate_run_config(config, source)
    data = data_prep_config(checked.corpus, checked.data)
    confine_roots(data, deployment_roots, base_dir or Path.cwd())
    return data
