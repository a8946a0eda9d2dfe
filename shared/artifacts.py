"""The artifact store: a root directory addressed by file:// URIs, or an s3://bucket/prefix.

Events carry references (URI + SHA-256 + size), never bytes. A service resolves an
incoming URI only inside its store: an event pointing elsewhere is refused.

With an `s3://bucket/prefix` root (shared/s3store.py) services still write into a local
directory (`root`: a staging area under the state dir); `ref()` publishes the file (a
directory artifact's files first, its manifest last, each verified after upload) and returns
an `s3://` reference; `open_verified()` downloads into a content-addressed local cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from contracts import ArtifactRef
from shared.s3store import MANIFEST_NAME, S3Backend, S3Location, S3Options, is_s3_root

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

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        state_dir: str | os.PathLike[str] | None = None,
        s3: S3Options | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """`root`: a directory, or `s3://bucket/prefix` (then the staging area and the cache live
        under `state_dir`, default HELOX_STATE_DIR or .helox/state; `s3` default: HELOX_S3_*/AWS_*)."""
        self.remote: S3Backend | None = None
        self.spec = os.fspath(root)
        if is_s3_root(root):
            loc = S3Location.parse(root)
            self.spec = loc.uri
            state = Path(state_dir if state_dir is not None else os.environ.get("HELOX_STATE_DIR", ".helox/state"))
            state = state.expanduser().resolve()
            staging = state / "artifacts-s3" / loc.bucket / (loc.prefix or "_")
            cache = Path(cache_dir).expanduser().resolve() if cache_dir is not None else state / "artifact-cache"
            self.remote = S3Backend(loc, s3 or S3Options.from_env(), cache)
            self.root = staging
        else:
            self.root = Path(root).expanduser().resolve()

    @classmethod
    def from_settings(cls, settings: Any) -> ArtifactStore:
        """The store a HeloxSettings names (its S3 endpoint and credentials when `artifacts` is s3://)."""
        if not is_s3_root(settings.artifacts):
            return cls(settings.artifacts)

        def secret(v: Any) -> str | None:
            return v.get_secret_value() if hasattr(v, "get_secret_value") else v

        env = S3Options.from_env()
        opts = S3Options(
            endpoint_url=getattr(settings, "s3_endpoint_url", None) or env.endpoint_url,
            access_key_id=secret(getattr(settings, "s3_access_key_id", None)) or env.access_key_id,
            secret_access_key=secret(getattr(settings, "s3_secret_access_key", None)) or env.secret_access_key,
            region=getattr(settings, "s3_region", None) or env.region,
        )
        return cls(settings.artifacts, state_dir=settings.state_dir, s3=opts)

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def path(self, *parts: str) -> Path:
        """A path inside the store (nothing is created)."""
        p = self.root.joinpath(*parts).resolve()
        self._check_inside(p, "/".join(parts))
        return p

    def uri(self, path: str | os.PathLike[str]) -> str:
        p = Path(path).resolve()
        self._check_inside(p, str(path))
        if self.remote is not None:
            return self.remote.location.uri_of(self._rel(p))
        return p.as_uri()

    def resolve(self, uri_or_path: str | os.PathLike[str]) -> Path:
        """The local path of a file:// URI or path; refuses anything outside the store."""
        text = str(uri_or_path)
        if self.remote is not None and text.startswith("s3://"):
            # The staging-area counterpart of an object (nothing is downloaded: see open_verified).
            return self.root.joinpath(self._s3_rel(text)).resolve()
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
        if self.remote is not None:
            rel = self._rel(p)
            digest, size = self.remote.publish(rel, p)
            return ArtifactRef(uri=self.remote.location.uri_of(rel), sha256=digest, size_bytes=size)
        return ArtifactRef(uri=p.as_uri(), sha256=sha256_file(p), size_bytes=p.stat().st_size)

    def open_verified(self, ref: ArtifactRef) -> Path:
        """Resolve a reference and check size and SHA-256; raises ArtifactDigestError naming the file.

        s3:// references: the verified copy in the local cache (downloaded once); for a
        manifest.json listing files beside it, a cached directory holding them all, each
        verified against the manifest, so `open_verified(ref).parent` is the artifact's directory."""
        if self.remote is not None and ref.uri.startswith("s3://"):
            rel = self._s3_rel(ref.uri)
            cached = self.remote.fetch(rel, ref.sha256, ref.size_bytes)
            if rel.rpartition("/")[2] == MANIFEST_NAME:
                return self.remote.fetch_dir(rel, cached, ref.sha256)
            return cached
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

    def open_directory(self, ref: ArtifactRef) -> Path:
        """The local directory of a directory artifact (a checkpoint, a dataset, an export), given
        its manifest.json reference: verified (s3://: every file in the cache, checked against the
        manifest), so its files can be read by path."""
        return self.open_verified(ref).parent

    def key(self, uri_or_path: str | os.PathLike[str]) -> str:
        """The store-relative key of a URI or path (`runs/r1/checkpoints/step-20/manifest.json`);
        ArtifactOutsideStoreError outside the store (another bucket, another prefix, another root)."""
        text = os.fspath(uri_or_path)
        if self.remote is not None and text.startswith("s3://"):
            return self._s3_rel(text)
        return self._rel(self.resolve(text))

    def current_ref(self, key: str) -> ArtifactRef:
        """The reference of what the store holds at `key` now (s3://: downloaded once into the cache
        to hash it). For a manifest found by name rather than by an event's reference (a dataset
        version's): the files it lists are then verified against it by open_verified."""
        p = self.path(*key.split("/"))
        if self.remote is None:
            if not p.is_file():
                raise FileNotFoundError(f"artifact {p} does not exist")
            return ArtifactRef(uri=p.as_uri(), sha256=sha256_file(p), size_bytes=p.stat().st_size)
        rel = self._rel(p)
        _cached, digest, size = self.remote.fetch_current(rel)
        return ArtifactRef(uri=self.remote.location.uri_of(rel), sha256=digest, size_bytes=size)

    def dataset_manifest(self, version: str) -> Path:
        """`datasets/<version>/manifest.json` with its files beside it, as a local path (s3://: the
        verified cached copy). A dataset version is derived from its content; CheckpointSaved names
        it without a digest, so the manifest is taken as the store holds it and its files are
        checked against it."""
        if not version or "/" in version or version in (".", ".."):
            raise ArtifactOutsideStoreError(f"{version!r} is not a dataset version")
        if self.remote is None:
            p = self.path("datasets", version, MANIFEST_NAME)
            if not p.is_file():
                raise FileNotFoundError(f"dataset {version} is not in the store ({p} missing)")
            return p
        return self.open_verified(self.current_ref(f"datasets/{version}/{MANIFEST_NAME}"))

    def list_keys(self, key_prefix: str) -> list[str]:
        """Store-relative keys of the files under `key_prefix` (a directory key, e.g. `runs/r1/checkpoints`)."""
        if self.remote is not None:
            base = self._rel(self.path(*key_prefix.split("/")))
            return self.remote.list_keys(base + "/")
        d = self.path(*key_prefix.split("/"))
        if not d.is_dir():
            return []
        return sorted(self._rel(p) for p in d.rglob("*") if p.is_file())

    def read_verified(self, ref: ArtifactRef) -> bytes:
        """The bytes of a (small) referenced file, checked against its size and SHA-256 as read:
        what is returned is exactly what was verified. Raises like `open_verified`."""
        if self.remote is not None and ref.uri.startswith("s3://"):
            p = self.remote.fetch(self._s3_rel(ref.uri), ref.sha256, ref.size_bytes)
        else:
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

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()

    def _s3_rel(self, uri: str) -> str:
        assert self.remote is not None
        rel = self.remote.location.relative(uri)
        if rel is None or rel == "":
            raise ArtifactOutsideStoreError(
                f"{uri!r} lies outside the artifact store {self.remote.location.uri}"
            )
        return rel


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
