"""The one checkpoint format, used by the trainer, the evaluator and the exporter.

A checkpoint is a directory `step-000000123/` under a root:

    model.safetensors   model weights (tied weights stored once, aliases in its metadata)
    state.safetensors   every other tensor: optimizer moments, RNG states, ...
    state.json          the rest as JSON (tensors replaced by references into state.safetensors)
    manifest.json       format, step, metric, meta, and the SHA-256 + size of each file above

The checkpoint's digest (its identity in events) is the SHA-256 of manifest.json. Loading
verifies every file against the manifest and refuses a mismatch with CheckpointCorruptError;
nothing is unpickled, ever. Writes go to a hidden temporary directory renamed into place,
so a crash leaves either the old state or the complete new checkpoint. A background
`CheckpointWriter` writes CPU snapshots so that the training loop only pays for the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.artifacts import sha256_bytes, sha256_file
from shared.logging import get_logger

FORMAT = "helox-checkpoint/1"
MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_JSON_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_PREFIX = "step-"

log = get_logger("helox.checkpoint")


class CheckpointError(Exception):
    """Base class of checkpoint errors."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing or does not match its manifest digest."""

    def __init__(self, path: Path, file: str, reason: str) -> None:
        self.path, self.file, self.reason = Path(path), file, reason
        super().__init__(
            f"checkpoint {self.path} is corrupt: {file}: {reason}. "
            "Resume from an earlier checkpoint (latest_valid_checkpoint falls back automatically) or delete it."
        )


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (valid) checkpoint where one was expected."""


# --- tree encoding: nested dict/list/tuple with tensors -> JSON + flat tensor dict ----------


def encode_tree(
    obj: Any, tensors: dict[str, torch.Tensor] | None = None, path: str = ""
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able tree and a flat {key: tensor} dict.

    Tensors and numpy arrays become {"__tensor__": key} / {"__ndarray__": key}; tuples and
    dicts with non-string keys are tagged so that they come back with their types.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        key = path or "root"
        while key in tensors:  # "a/b" as one key vs nested: keep both
            key += "'"
        if isinstance(obj, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
            return {"__ndarray__": key}, tensors
        tensors[key] = obj
        return {"__tensor__": key}, tensors
    if isinstance(obj, np.generic):
        return obj.item(), tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}/{k}")[0] for k, v in obj.items()}, tensors
        items = [[k, encode_tree(v, tensors, f"{path}/{k}")[0]] for k, v in obj.items()]
        return {"__dict__": items}, tensors
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}/{i}")[0] for i, v in enumerate(obj)]}, tensors
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}/{i}")[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    if isinstance(obj, Path):
        return str(obj), tensors
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint: use tensors, arrays or JSON types")


def decode_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_tree`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy()
        if "__tuple__" in tree:
            return tuple(decode_tree(v, tensors) for v in tree["__tuple__"])
        if "__dict__" in tree:
            return {k: decode_tree(v, tensors) for k, v in tree["__dict__"]}
        return {k: decode_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_tree(v, tensors) for v in tree]
    return tree


# --- snapshot and write ------------------------------------------------------------------


@dataclass
class CheckpointSnapshot:
    """A checkpoint held in CPU memory, independent of the live tensors."""

    step: int
    model: dict[str, torch.Tensor]
    aliases: dict[str, str]
    state_tree: Any
    state_tensors: dict[str, torch.Tensor]
    metric: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    digest: str
    metric: float | None
    meta: dict[str, Any]
    created_at: str

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST_FILE


@dataclass
class Checkpoint:
    """A loaded checkpoint: model weights, the decoded state, and its manifest facts."""

    path: Path
    step: int
    digest: str
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    metric: float | None
    meta: dict[str, Any]


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # a DTensor slipped through: gather it
        t = t.full_tensor()
    # clone() also for CPU tensors: the snapshot must not change while the loop trains on.
    return t.detach().to("cpu", copy=True).contiguous()


def snapshot(
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    metric: float | None = None,
    meta: dict[str, Any] | None = None,
) -> CheckpointSnapshot:
    """Copy model weights and training state to CPU memory (the only part the loop waits for)."""
    model: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model_state.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if not hasattr(t, "full_tensor") else None
        if ident is not None and ident in seen:
            aliases[name] = seen[ident]  # tied weights: store once
            continue
        if ident is not None:
            seen[ident] = name
        model[name] = _cpu_copy(t)
    tree, tensors = encode_tree(state)
    tensors = {k: _cpu_copy(v) for k, v in tensors.items()}
    if metric is not None and not math.isfinite(metric):
        metric = None
    return CheckpointSnapshot(step, model, aliases, tree, tensors, metric, dict(meta or {}))


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_WRITE_CHUNK = 8 << 20


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                      duty_cycle: float = 1.0) -> tuple[str, int]:
    """Write a safetensors file and return (sha256, size) computed on the way.

    Written from Python in chunks rather than by `safetensors.save_file`, which holds the GIL
    for the whole file: from a background thread that stalled the training loop for seconds
    per checkpoint. `file.write`, `hashlib.update` and `fsync` release the GIL. The layout is
    the safetensors format (8-byte header length, JSON header padded to 8 bytes, raw data).
    duty_cycle < 1 sleeps between chunks (busy fraction = duty_cycle), spreading the writer's
    CPU use over more training steps.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        prefix = len(head).to_bytes(8, "little") + head
        f.write(prefix)
        digest.update(prefix)
        for t in tensors.values():
            if t.numel() == 0:
                continue
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # little-endian on every supported host
            for i in range(0, raw.nbytes, _WRITE_CHUNK):
                t0 = time.perf_counter()
                chunk = memoryview(raw[i:i + _WRITE_CHUNK])
                f.write(chunk)
                digest.update(chunk)
                if duty_cycle < 1.0:
                    time.sleep((time.perf_counter() - t0) * (1.0 / duty_cycle - 1.0))
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), len(prefix) + offset


def checkpoint_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:09d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(
    root: str | os.PathLike[str], snap: CheckpointSnapshot, *, keep_last: int | None = None, keep_best: bool = True,
    duty_cycle: float = 1.0,
) -> CheckpointInfo:
    """Write a snapshot atomically under root, then prune to the last `keep_last` (+ best)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_dir_name(snap.step)
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for fname, tensors, meta in (
            (MODEL_FILE, snap.model, {"format": FORMAT, "aliases": json.dumps(snap.aliases)}),
            (STATE_TENSORS_FILE, snap.state_tensors, {"format": FORMAT}),
        ):
            digest, size = write_safetensors(tmp / fname, tensors, meta, duty_cycle=duty_cycle)
            files[fname] = {"sha256": digest, "bytes": size}
        state_json = json.dumps(snap.state_tree, separators=(",", ":")).encode()
        (tmp / STATE_JSON_FILE).write_bytes(state_json)
        _fsync_file(tmp / STATE_JSON_FILE)
        files[STATE_JSON_FILE] = {"sha256": sha256_bytes(state_json), "bytes": len(state_json)}
        created = datetime.now(UTC).isoformat()
        manifest = {
            "format": FORMAT,
            "step": snap.step,
            "metric": snap.metric,
            "created_at": created,
            "meta": snap.meta,
            "files": files,
        }
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        (tmp / MANIFEST_FILE).write_bytes(data)
        _fsync_file(tmp / MANIFEST_FILE)
        _fsync_dir(tmp)
        final = root / name
        trash = None
        if final.exists():  # the same step written again (after a rollback): replace it
            trash = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = CheckpointInfo(final, snap.step, sha256_bytes(data), snap.metric, snap.meta, created)
    if keep_last is not None:
        prune_checkpoints(root, keep_last=keep_last, keep_best=keep_best, protect=(final,))
    return info


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    metric: float | None = None,
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
    keep_best: bool = True,
) -> CheckpointInfo:
    """Snapshot and write synchronously."""
    return write_checkpoint(
        root, snapshot(step, model_state, state, metric=metric, meta=meta), keep_last=keep_last, keep_best=keep_best
    )


class CheckpointWriter:
    """Writes snapshots on one background thread, in submission order.

    `submit` returns a Future[CheckpointInfo]; a failed write re-raises from its Future and
    from the next `submit`/`wait`, so an error is never silently lost.
    """

    def __init__(self, root: str | os.PathLike[str], *, keep_last: int | None = None, keep_best: bool = True,
                 background: bool = True, duty_cycle: float = 1.0) -> None:
        self.root = Path(root)
        self.keep_last, self.keep_best, self.background = keep_last, keep_best, background
        self.duty_cycle = duty_cycle if background else 1.0
        self._queue: queue.Queue[tuple[CheckpointSnapshot, Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: list[Future] = []

    def _run(self) -> None:
        # The lowest priority (nice 19) for the writer: on a busy CPU every timeslice it takes stalls the
        # training threads at their next barrier; idle time (and the final wait) is enough to finish writes.
        with contextlib.suppress(Exception):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (item := self._queue.get()) is not None:
            snap, fut = item
            try:
                fut.set_result(write_checkpoint(self.root, snap, keep_last=self.keep_last, keep_best=self.keep_best,
                                               duty_cycle=self.duty_cycle))
            except BaseException as exc:
                self._error = exc
                fut.set_exception(exc)

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"a background checkpoint write failed: {err}") from err

    def submit(self, snap: CheckpointSnapshot) -> Future:
        self._raise_pending_error()
        fut: Future = Future()
        if not self.background:
            try:
                fut.set_result(write_checkpoint(self.root, snap, keep_last=self.keep_last, keep_best=self.keep_best,
                                               duty_cycle=self.duty_cycle))
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            self._pending.append(fut)  # reported by done() like a background write
            return fut
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._pending.append(fut)
        self._queue.put((snap, fut))
        return fut

    def done(self) -> list[Future]:
        """Futures finished since the last call (in submission order)."""
        out = []
        while self._pending and self._pending[0].done():
            out.append(self._pending.pop(0))
        return out

    @property
    def busy(self) -> bool:
        return any(not f.done() for f in self._pending)

    def wait(self) -> None:
        """Block until every submitted write finished; raise the first failure."""
        for fut in list(self._pending):
            with contextlib.suppress(BaseException):
                fut.result()
        self._raise_pending_error()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._raise_pending_error()


# --- reading ------------------------------------------------------------------------------


def _read_manifest(path: Path) -> tuple[dict[str, Any], bytes]:
    mpath = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at {path}")
    try:
        data = mpath.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(path, MANIFEST_FILE, "missing") from None
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise CheckpointCorruptError(path, MANIFEST_FILE, f"not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointCorruptError(path, MANIFEST_FILE, f"unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest, data


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """The checkpoint's identity: SHA-256 of its manifest (files not re-hashed)."""
    return sha256_bytes(_read_manifest(Path(path))[1])


def verify_checkpoint(path: str | os.PathLike[str], expected_digest: str | None = None) -> str:
    """Check every file against the manifest; return the digest or raise CheckpointCorruptError."""
    path = Path(path)
    manifest, data = _read_manifest(path)
    digest = sha256_bytes(data)
    if expected_digest is not None and digest != expected_digest:
        raise CheckpointCorruptError(path, MANIFEST_FILE, f"digest {digest} differs from the expected {expected_digest}")
    for fname, entry in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointCorruptError(path, fname, "missing")
        if fpath.stat().st_size != entry["bytes"]:
            raise CheckpointCorruptError(path, fname, f"size {fpath.stat().st_size} != {entry['bytes']} in the manifest")
        actual = sha256_file(fpath)
        if actual != entry["sha256"]:
            raise CheckpointCorruptError(path, fname, f"sha256 {actual} != {entry['sha256']} in the manifest")
    return digest


def load_model_weights(path: str | os.PathLike[str], *, verify: bool = True, expected_digest: str | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Just the model state dict (tied weights re-expanded), e.g. for the evaluator/exporter."""
    path = Path(path)
    if verify:
        verify_checkpoint(path, expected_digest)
    weights = load_file(str(path / MODEL_FILE), device=str(device))
    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        weights[name] = weights[target]
    return weights


def load_checkpoint(
    path: str | os.PathLike[str], *, expected_digest: str | None = None, verify: bool = True,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Load and verify a checkpoint directory (no pickle involved)."""
    path = Path(path)
    digest = verify_checkpoint(path, expected_digest) if verify else checkpoint_digest(path)
    manifest, _ = _read_manifest(path)
    model = load_model_weights(path, verify=False, device=device)
    tensors = load_file(str(path / STATE_TENSORS_FILE), device=str(device))
    tree = json.loads((path / STATE_JSON_FILE).read_text())
    return Checkpoint(path, manifest["step"], digest, model, decode_tree(tree, tensors), manifest.get("metric"),
                      manifest.get("meta", {}))


def read_state_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON part of the state (tensor references left as {"__tensor__": key}); unverified."""
    return json.loads((Path(path) / STATE_JSON_FILE).read_text())


def list_checkpoints(root: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Checkpoints under root with a readable manifest, oldest step first (files not re-hashed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith(_PREFIX)):
            continue
        try:
            manifest, data = _read_manifest(p)
        except CheckpointError:
            continue
        out.append(CheckpointInfo(p, int(manifest["step"]), sha256_bytes(data), manifest.get("metric"),
                                  manifest.get("meta", {}), manifest.get("created_at", "")))
    return sorted(out, key=lambda i: i.step)


def latest_valid_checkpoint(
    root: str | os.PathLike[str], *, before_step: int | None = None,
    on_corrupt: Callable[[CheckpointCorruptError], None] | None = None,
) -> Path | None:
    """The newest checkpoint (optionally with step < before_step) whose files match its manifest.

    Corrupt ones are skipped, so a damaged last checkpoint falls back to the previous one; each
    skip is logged as a warning and handed to `on_corrupt`, so that the caller can report it.
    """
    for info in reversed(list_checkpoints(root)):
        if before_step is not None and info.step >= before_step:
            continue
        try:
            verify_checkpoint(info.path)
        except CheckpointCorruptError as exc:
            log.warning("checkpoint.corrupt_skipped", path=str(exc.path), file=exc.file, reason=exc.reason)
            if on_corrupt is not None:
                on_corrupt(exc)
            continue
        return info.path
    return None


def best_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the lowest metric (validation loss), if any has one."""
    scored = [i for i in list_checkpoints(root) if i.metric is not None]
    return min(scored, key=lambda i: (i.metric, -i.step)).path if scored else None


def prune_checkpoints(root: str | os.PathLike[str], *, keep_last: int, keep_best: bool = True,
                      protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the last `keep_last` checkpoints (plus the best, plus `protect`)."""
    root = Path(root)
    infos = list_checkpoints(root)
    keep = {i.path for i in infos[-keep_last:]} if keep_last > 0 else set()
    if keep_best and (best := best_checkpoint(root)) is not None:
        keep.add(best)
    keep.update(Path(p) for p in protect)
    removed = []
    for info in infos:
        if info.path not in keep:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.path)
    for stale in root.glob(".trash-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def remove_checkpoints_after(root: str | os.PathLike[str], step: int) -> list[Path]:
    """Delete checkpoints newer than `step` (an abandoned timeline after a rollback)."""
    removed = []
    for info in list_checkpoints(root):
        if info.step > step:
            shutil.rmtree(info.path, ignore_errors=True)
            removed.append(info.path)
    return removed


def clean_temporary(root: str | os.PathLike[str]) -> list[Path]:
    """Remove leftovers of interrupted writes (call when no writer is running on root)."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", expected_digest: str | None = None):
    """Rebuild the `Llama` a trainer checkpoint holds: returns (model, model_config)."""
    from shared.model import Llama, ModelConfig

    verify_checkpoint(path, expected_digest)
    state = read_state_json(path)
    if "model_config" not in state:
        raise CheckpointError(f"{path} has no model_config in {STATE_JSON_FILE}; it was not written by the trainer")
    config = ModelConfig(**state["model_config"])
    model = Llama(config)
    model.load_state_dict(load_model_weights(path, verify=False, device=device), strict=True)
    return model.to(device), config
