"""What every `helox` command shares: the consoles, settings, the Redis client, dataset lookup."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.markup import escape

from contracts import Producer
from shared.config import HeloxSettings, load_settings
from shared.redis_server import RedisServer

from .errors import CliError
from .runconfig import RunConfig, load_run_config
from .stack import find_running_stack, local_signing_key

console = Console()
err = Console(stderr=True)
CLI_PRODUCER = Producer(service="cli", instance=f"cli-{os.getpid()}")


# What `helox run` shows, and `helox generate`'s defaults: sampled (not greedy, which loops on
# a small model), seeded, with a repetition penalty: the demo model (2500 steps) at 0.8 / 40 /
# 0.95 repeated a 4-gram 3x at seed 0 and up to 4x over seeds 0-7 without one; with 1.3, no
# 4-gram twice at any of them.
RUN_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.3, "seed": 0}

def notice(text: str) -> None:
    """A line for the person watching, on stderr: stdout stays the command's output (JSON lines)."""
    err.print(f"[yellow]{escape(text)}[/yellow]", soft_wrap=True, highlight=False)


def settings(config: Path | None = None) -> HeloxSettings:
    """The deployment settings (HELOX_* environment, plus a config file's `settings:`)."""
    return load_settings(config)


def load_run(config: Path) -> tuple[RunConfig, HeloxSettings]:
    """The run config and the settings (its `settings:` section + env); ConfigError names the field."""
    return load_run_config(config), load_settings(config)


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop a stack cleanly (SIGINT may be ignored when backgrounded)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def redis_url(cfg: HeloxSettings) -> str:
    """The configured Redis, else a running local stack's; CliError when there is neither."""
    url = cfg.redis_url or find_running_stack(cfg)
    if not url:
        raise CliError("no Redis: set HELOX_REDIS_URL or start the local stack with `helox up`")
    return url


def client(cfg: HeloxSettings) -> redis.Redis:
    return redis.Redis.from_url(redis_url(cfg), socket_timeout=10)


@contextlib.contextmanager
def reading(cfg: HeloxSettings) -> Iterator[redis.Redis]:
    """A client for a command that only reads events: the configured Redis, a running local
    stack's, or else the local stack's own data on disk (its embedded Redis started on that
    data for the command's length), so that a run `helox run` finished can still be watched
    back or reported after its stack stopped."""
    if cfg.redis_url or find_running_stack(cfg):
        yield client(cfg)
        return
    data = Path(cfg.state_dir).resolve() / "redis"
    if not data.is_dir():
        raise CliError("no Redis: set HELOX_REDIS_URL or start the local stack with `helox up` "
                       f"(and no local stack data in {data})")
    server = RedisServer(data).start()
    try:
        yield redis.Redis.from_url(server.url, socket_timeout=10)
    finally:
        server.stop()


def manifest_path(cfg: HeloxSettings, version: str) -> Path:
    """A dataset's manifest: VERSION as a path (directory or manifest file), else a version in the store."""
    from shared.artifacts import ArtifactStore

    candidate = Path(version)
    if candidate.exists():
        return candidate / "manifest.json" if candidate.is_dir() else candidate
    store = ArtifactStore.from_settings(cfg)
    if store.is_remote:  # s3://: the verified copy in the local cache, its files checked against it
        try:
            return store.dataset_manifest(version)
        except (FileNotFoundError, ValueError) as exc:
            raise CliError(f"no dataset {version!r} in {cfg.artifacts}: {exc}") from exc
    path = store.path("datasets", version, "manifest.json")
    if not path.exists():
        raise CliError(f"no dataset {version!r} in {cfg.artifacts} (looked for {path})")
    return path


def checkpoint_dataset_manifest(cfg: HeloxSettings, checkpoint: str | Path) -> Path:
    """The manifest of the dataset a trainer checkpoint was trained on (its meta.dataset_version),
    from the configured artifact store (s3:// included)."""
    from services.evaluator.evaluate import read_checkpoint_manifest

    try:
        version = read_checkpoint_manifest(checkpoint).get("meta", {}).get("dataset_version")
    except (OSError, ValueError) as exc:
        raise CliError(f"{checkpoint}: {exc}") from exc
    if not version:
        raise CliError(f"{checkpoint} names no dataset_version in its manifest meta; pass the dataset")
    return manifest_path(cfg, version)


def s3_directory(store: Any, manifest: Any) -> Path:
    """A directory artifact in an s3:// store as a local directory, given its manifest.json
    reference: every file it lists, from the verified cache; for an export, its detached
    signature.json (published beside the manifest, not listed in it) too, so the export verifies
    as it does on disk. The cached directory is shared and keyed by the manifest alone: the
    signed view is a directory of links beside it."""
    import shutil
    import uuid

    from shared.s3store import link_or_copy

    cached = store.open_directory(manifest)
    base = store.key(manifest.uri).rpartition("/")[0]
    try:
        sig_ref = store.current_ref(f"{base}/signature.json" if base else "signature.json")
    except FileNotFoundError:
        return cached  # not an export: a checkpoint, a dataset
    signature = store.open_verified(sig_ref)
    view = cached.parent.parent / "views" / f"{manifest.sha256}-{sig_ref.sha256[:16]}"
    if (view / "signature.json").is_file():
        return view
    tmp = view.parent / f".{view.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        for src in sorted(cached.rglob("*")):
            dst = tmp / src.relative_to(cached)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src, dst)
        shutil.copyfile(signature, tmp / "signature.json")
        try:
            os.rename(tmp, view)
        except OSError:
            if not (view / "signature.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def signing_key(cfg: HeloxSettings) -> str:
    """HELOX_SIGNING_KEY, else the local stack's development key."""
    return cfg.signing_key.get_secret_value() if cfg.signing_key else local_signing_key(cfg.state_dir)
