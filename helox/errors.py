"""The CLI's one error boundary: a user error is one line on stderr and exit 2.

A user error is something the person at the keyboard can fix (a bad config field, a dataset
version that is not in the store, a corrupt checkpoint, a training run that cannot resume):
the message names the thing at fault, and a traceback would only bury it. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

# The project's user-facing exception classes, by defining module. Looked up in sys.modules
# only: an exception of a class whose module was never imported cannot have been raised, so
# the boundary never imports torch just to decide how to print an error.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "shared.config": ("ConfigError",),
    "shared.redis_server": ("RedisServerError",),
    "shared.artifacts": ("ArtifactOutsideStoreError", "ArtifactDigestError"),
    "shared.checkpoint": ("CheckpointError",),
    "shared.data.dataset": ("DatasetError",),
    "shared.data.manifest": ("ManifestError", "ShardCorruptError"),
    "shared.model.config": ("UnknownPresetError",),
    "shared.runs": ("RunConfigError", "RunConfigMissingError"),
    "contracts.codec": ("DecodeError", "SchemaVersionError"),
    "services.data_prep.ingest": ("CorpusError",),
    "services.data_prep.tokenizer": ("TokenizerError",),
    "services.trainer.loop": ("TrainingError",),
    "services.trainer.data": ("DataSourceError",),
    "services.trainer.precision": ("PrecisionError",),
    "services.trainer.distributed": ("DistributedConfigError",),
    "services.evaluator.evaluate": ("EvaluationError",),
    "services.evaluator.suites": ("SuiteError",),
    "services.exporter.export": ("ExportError",),
    "services.exporter.native": ("ExportFormatError",),
    "services.exporter.provenance": ("SignatureKeyError",),
    "helox.errors": ("CliError",),
}


class CliError(Exception):
    """A user error found by the CLI itself (no Redis to talk to, no such dataset)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The user-error classes among the modules imported so far."""
    found: list[type[BaseException]] = []
    for module, names in USER_ERRORS.items():
        mod = sys.modules.get(module)
        if mod is not None:  # a name gone from its module must not mask the error being reported
            found.extend(t for t in (getattr(mod, name, None) for name in names) if isinstance(t, type))
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())


def one_line(exc: BaseException) -> str:
    """The message on one line: a multi-line message (one bad field a line) joined with '; '."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)
