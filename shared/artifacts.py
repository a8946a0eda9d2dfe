"""The artifact store: a root directory addressed by file:// URIs.

Events carry references (URI + SHA-256 + size), never bytes. A service resolves an
incoming URI only inside its store: an event pointing elsewhere is refused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from contracts import ArtifactRef

_CHUNK = 1 << 20


class ArtifactOutsideStoreError(ValueError):
    """A URI or path points outside the artifact store."""


class ArtifactDigestError(ValueError):
    """A file's bytes do not match the SHA-256 its reference promises."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """A directory tree holding datasets, checkpoints and exports."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, *parts: str) -> Path:
        """A path inside the store (nothing is created)."""
        p = self.root.joinpath(*parts).resolve()
        self._check_inside(p, "/".join(parts))
        return p

    def uri(self, path: str | os.PathLike[str]) -> str:
        p = Path(path).resolve()
        self._check_inside(p, str(path))
        return p.as_uri()

    def resolve(self, uri_or_path: str | os.PathLike[str]) -> Path:
        """The local path of a file:// URI or path; refuses anything outside the store."""
        text = str(uri_or_path)
        if "://" in text:
            parsed = urlparse(text)
            if parsed.scheme != "file":
                raise ArtifactOutsideStoreError(
                    f"unsupported artifact URI scheme {parsed.scheme!r} in {text!r}: this store serves file:// only"
                )
            p = Path(unquote(parsed.path))
        else:
            p = Path(text)
        if not p.is_absolute():
            p = self.root / p
        p = p.resolve()
        self._check_inside(p, text)
        return p

    def ref(self, path: str | os.PathLike[str]) -> ArtifactRef:
        """An ArtifactRef (URI, SHA-256, size) for a file in the store."""
        p = self.resolve(path)
        return ArtifactRef(uri=p.as_uri(), sha256=sha256_file(p), size_bytes=p.stat().st_size)

    def open_verified(self, ref: ArtifactRef) -> Path:
        """Resolve a reference and check size and SHA-256; raises ArtifactDigestError naming the file."""
        p = self.resolve(ref.uri)
        if not p.is_file():
            raise FileNotFoundError(f"artifact {ref.uri} does not exist")
        size = p.stat().st_size
        if size != ref.size_bytes:
            raise ArtifactDigestError(f"{p}: size {size} != {ref.size_bytes} in its reference")
        digest = sha256_file(p)
        if digest != ref.sha256:
            raise ArtifactDigestError(f"{p}: sha256 {digest} != {ref.sha256} in its reference")
        return p

    def read_verified(self, ref: ArtifactRef) -> bytes:
        """The bytes of a (small) referenced file, checked against its size and SHA-256 as read:
        what is returned is exactly what was verified. Raises like `open_verified`."""
        p = self.resolve(ref.uri)
        if not p.is_file():
            raise FileNotFoundError(f"artifact {ref.uri} does not exist")
        data = p.read_bytes()
        if len(data) != ref.size_bytes:
            raise ArtifactDigestError(f"{p}: size {len(data)} != {ref.size_bytes} in its reference")
        digest = sha256_bytes(data)
        if digest != ref.sha256:
            raise ArtifactDigestError(f"{p}: sha256 {digest} != {ref.sha256} in its reference")
        return data

    def atomic_write_bytes(self, path: str | os.PathLike[str], data: bytes) -> Path:
        """Write a file atomically: temp file in the same directory, fsync, rename."""
        p = self.resolve(path)
        return atomic_write_bytes(p, data)

    def _check_inside(self, p: Path, shown: str) -> None:
        if p != self.root and self.root not in p.parents:
            raise ArtifactOutsideStoreError(f"{shown!r} resolves to {p}, outside the artifact store {self.root}")


def process_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), since
    setting it to read it back would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (temp + fsync + rename + directory fsync)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; the file gets the mode a plain open() would give it.
        os.fchmod(fd, 0o666 & ~process_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
