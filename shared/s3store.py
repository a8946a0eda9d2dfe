"""The S3 side of the artifact store: `s3://bucket/prefix` roots, publishing and a local cache.

Services keep writing into a local working directory (the staging area, under the state
dir); `ArtifactStore.ref()` publishes a file to the bucket and hands out an `s3://` reference,
`ArtifactStore.open_verified()` downloads a referenced object into a content-addressed cache
(`<cache>/<sha256[:2]>/<sha256>`), verified against the reference, once.

A directory-shaped artifact (a dataset, a checkpoint, an export: a `manifest.json` listing the
SHA-256 of the files next to it) is published file by file, each verified after upload, the
manifest LAST: a reader that sees the manifest sees complete files. Opened, it becomes a local
directory `<cache>/dirs/<manifest sha256>/` holding the manifest and its files, each checked
against the manifest's own digests (files come from the content-addressed cache, so a file
shared by two manifests is downloaded once).

The client is obstore (the Rust object_store crate), configured from HELOX_S3_* or AWS_*.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

_CHUNK = 8 << 20
MANIFEST_NAME = "manifest.json"
# Manifest subtrees listing files that are NOT in the artifact's directory (a dataset's corpus inputs).
_EXTERNAL_KEYS = frozenset({"inputs"})
_HEX = frozenset("0123456789abcdef")


class S3Error(RuntimeError):
    """The object store refused or failed an operation (the message names the object)."""


def is_s3_root(root: str | os.PathLike[str]) -> bool:
    """True for `s3://bucket/prefix` (also in the form a pathlib.Path collapses it to, `s3:/bucket/...`)."""
    text = os.fspath(root)
    return text.startswith("s3://") or text.startswith("s3:/")


def _clean_key(text: str, shown: str) -> str:
    parts = [p for p in text.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{shown!r}: '.' or '..' in an object key")
    return "/".join(parts)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading/trailing slash; "" for the whole bucket

    @classmethod
    def parse(cls, root: str | os.PathLike[str]) -> S3Location:
        text = os.fspath(root)
        if text.startswith("s3://"):
            rest = text[5:]
        elif text.startswith("s3:/"):
            rest = text[4:]
        else:
            raise ValueError(f"{text!r} is not an s3://bucket/prefix URI")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"{text!r}: no bucket")
        return cls(bucket, _clean_key(prefix, text))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def relative(self, uri: str) -> str | None:
        """The key of `uri` relative to the prefix; None when the URI lies outside bucket/prefix."""
        if not uri.startswith("s3://"):
            return None
        bucket, _, key = uri[5:].partition("/")
        if bucket != self.bucket:
            return None
        try:
            key = _clean_key(key, uri)
        except ValueError:
            return None
        if not self.prefix:
            return key
        if key == self.prefix:
            return ""
        if key.startswith(self.prefix + "/"):
            return key[len(self.prefix) + 1:]
        return None


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str = "us-east-1"
    # A server restart mid-run must not fail a publish or a download: requests are retried with
    # backoff (0.5 s doubling to 5 s, jittered) for this long. (obstore's default, 10 quick
    # retries, gives up within ~2 s of a refused connection.)
    retry_timeout_s: float = 240.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Options:
        e = os.environ if env is None else env

        def pick(*names: str) -> str | None:
            for n in names:
                if e.get(n):
                    return e[n]
            return None

        return cls(
            endpoint_url=pick("HELOX_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            access_key_id=pick("HELOX_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            secret_access_key=pick("HELOX_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
            region=pick("HELOX_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
        )


def manifest_entries(manifest: Any) -> dict[str, tuple[str, int | None]]:
    """Files a manifest lists next to itself: relative path -> (sha256, size or None).

    Understands `files: {rel: {sha256, bytes}}` (checkpoints, exports) and any object with
    `path` + `sha256` (+ `size_bytes`/`bytes`) (dataset shards, tokenizer, masks, reports);
    skips subtrees naming files elsewhere (a dataset's corpus `inputs`)."""
    out: dict[str, tuple[str, int | None]] = {}

    def size_of(d: dict[str, Any]) -> int | None:
        for k in ("size_bytes", "bytes", "size"):
            if isinstance(d.get(k), int):
                return int(d[k])
        return None

    def is_digest(v: Any) -> bool:
        return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            files = node.get("files")
            if isinstance(files, dict):
                for rel, entry in files.items():
                    if isinstance(rel, str) and isinstance(entry, dict) and is_digest(entry.get("sha256")):
                        out[rel] = (entry["sha256"], size_of(entry))
            if isinstance(node.get("path"), str) and is_digest(node.get("sha256")):
                out[node["path"]] = (node["sha256"], size_of(node))
            for k, v in node.items():
                if k in _EXTERNAL_KEYS or (k == "files" and isinstance(v, dict)):
                    continue
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(manifest)
    clean: dict[str, tuple[str, int | None]] = {}
    for rel, entry in out.items():
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or rel in ("", MANIFEST_NAME):
            continue
        clean[str(p)] = entry
    return clean


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class S3Backend:
    """Upload, verify and download objects under one bucket/prefix, with a content-addressed cache."""

    def __init__(self, location: S3Location, options: S3Options, cache_dir: Path) -> None:
        self.location = location
        self.options = options
        self.cache_dir = cache_dir
        self._client: Any = None
        self._lock = threading.Lock()
        # key -> (size, mtime_ns, sha256) of what this process has published (and verified).
        self._published: dict[str, tuple[int, int, str]] = {}
        self.downloads = 0  # objects fetched from the server (the cache's misses)

    # --- client ---------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    from obstore.store import S3Store
                except ImportError as exc:  # pragma: no cover - depends on the install
                    raise S3Error("an s3:// artifact store needs obstore: pip install 'helox[s3]'") from exc
                o = self.options
                kwargs: dict[str, Any] = {
                    "region": o.region,
                    "retry_config": {
                        "max_retries": max(10, int(o.retry_timeout_s / 2.5)),
                        "backoff": {"init_backoff": timedelta(seconds=0.5), "max_backoff": timedelta(seconds=5),
                                    "base": 2},
                        "retry_timeout": timedelta(seconds=o.retry_timeout_s),
                    },
                }
                if self.location.prefix:
                    kwargs["prefix"] = self.location.prefix
                if o.endpoint_url:
                    kwargs["endpoint"] = o.endpoint_url
                    kwargs["virtual_hosted_style_request"] = False
                    if o.endpoint_url.startswith("http://"):
                        kwargs["client_options"] = {"allow_http": True}
                if o.access_key_id:
                    kwargs["access_key_id"] = o.access_key_id
                if o.secret_access_key:
                    kwargs["secret_access_key"] = o.secret_access_key
                if not (o.access_key_id or o.secret_access_key):
                    kwargs["skip_signature"] = True
                self._client = S3Store(self.location.bucket, **kwargs)
            return self._client

    # --- primitives -----------------------------------------------------------------------

    def head(self, rel: str) -> dict[str, Any] | None:
        import obstore

        try:
            return obstore.head(self.client, rel)
        except FileNotFoundError:
            return None

    def put_file(self, rel: str, path: Path) -> None:
        import obstore

        try:
            obstore.put(self.client, rel, path)
        except Exception as exc:
            raise S3Error(f"upload of {path} to {self.location.uri_of(rel)} failed: {exc}") from exc

    def put_bytes(self, rel: str, data: bytes) -> None:
        import obstore

        obstore.put(self.client, rel, data)

    def delete(self, rel: str) -> None:
        import obstore

        obstore.delete(self.client, rel)

    def remote_digest(self, rel: str) -> tuple[str, int]:
        """SHA-256 and size of the object as the server returns it now."""
        import obstore

        h = hashlib.sha256()
        n = 0
        for chunk in obstore.get(self.client, rel).stream(min_chunk_size=_CHUNK):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    # --- publishing -----------------------------------------------------------------------

    def publish_file(self, rel: str, path: Path, sha256: str | None = None) -> tuple[str, int]:
        """Upload `path` as `rel` unless this process already published these bytes there, then
        verify the object by size and SHA-256 read back. Returns (sha256, size)."""
        st = path.stat()
        done = self._published.get(rel)
        if done and done[0] == st.st_size and done[1] == st.st_mtime_ns and (sha256 is None or done[2] == sha256):
            return done[2], done[0]
        digest, size = _hash_file(path)
        if sha256 is not None and digest != sha256:
            from shared.artifacts import ArtifactDigestError

            raise ArtifactDigestError(f"{path}: sha256 {digest} != {sha256} in its manifest; not published")
        self.put_file(rel, path)
        meta = self.head(rel)
        if meta is None or int(meta["size"]) != size:
            raise S3Error(f"{self.location.uri_of(rel)}: size after upload {meta and meta['size']} != {size}")
        remote, rsize = self.remote_digest(rel)
        if remote != digest or rsize != size:
            raise S3Error(f"{self.location.uri_of(rel)}: sha256 after upload {remote} != {digest}")
        self._published[rel] = (size, st.st_mtime_ns, digest)
        return digest, size

    def publish(self, rel: str, path: Path) -> tuple[str, int]:
        """Publish a file; for a manifest.json listing files next to it, those files first
        (each verified against the manifest), the manifest last."""
        if path.name == MANIFEST_NAME:
            try:
                manifest = json.loads(path.read_bytes())
            except ValueError:
                manifest = None
            entries = manifest_entries(manifest) if manifest is not None else {}
            base = rel.rpartition("/")[0]
            for frel, (sha, _size) in sorted(entries.items()):
                local = path.parent / frel
                if not local.is_file():
                    raise S3Error(f"{path} lists {frel}, which is not in {path.parent}: not published")
                self.publish_file(f"{base}/{frel}" if base else frel, local, sha)
        return self.publish_file(rel, path)

    # --- the cache ------------------------------------------------------------------------

    def cache_path(self, sha256: str) -> Path:
        return self.cache_dir / sha256[:2] / sha256

    def fetch(self, rel: str, sha256: str, size: int | None) -> Path:
        """The cached copy of object `rel` with these bytes, downloaded (and verified) on a miss."""
        from shared.artifacts import ArtifactDigestError

        dest = self.cache_path(sha256)
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            return dest

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{sha256[:16]}.", suffix=".part")
        try:
            digest, n = self._download(rel, fd)
            uri = self.location.uri_of(rel)
            if size is not None and n != size:
                raise ArtifactDigestError(f"{uri}: size {n} != {size} in its reference")
            if digest != sha256:
                raise ArtifactDigestError(f"{uri}: sha256 {digest} != {sha256} in its reference")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)  # concurrent fetches of the same digest: same bytes, last rename wins
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _download(self, rel: str, fd: int) -> tuple[str, int]:
        """Stream object `rel` into the open temporary file `fd` (closed, fsynced): (sha256, size)."""
        import obstore

        h = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as f:
            try:
                stream = obstore.get(self.client, rel).stream(min_chunk_size=_CHUNK)
            except FileNotFoundError:
                raise FileNotFoundError(f"artifact {self.location.uri_of(rel)} does not exist") from None
            for chunk in stream:
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        self.downloads += 1
        return h.hexdigest(), n

    def fetch_current(self, rel: str) -> tuple[Path, str, int]:
        """Download object `rel` as the server holds it now (no digest known beforehand) into the
        content-addressed cache: (cached path, sha256, size). For a manifest found by its name
        (a dataset version's); the files it lists are then verified against it."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".current.", suffix=".part")
        try:
            digest, n = self._download(rel, fd)
            dest = self.cache_path(digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest, digest, n

    def list_keys(self, rel_prefix: str) -> list[str]:
        """Keys (relative to the store's prefix) of the objects under `rel_prefix`."""
        import obstore

        out: list[str] = []
        for batch in obstore.list(self.client, prefix=rel_prefix or None):
            out.extend(str(meta["path"]) for meta in batch)
        return sorted(out)

    def fetch_dir(self, rel: str, manifest_path: Path, manifest_sha: str) -> Path:
        """`<cache>/dirs/<manifest sha>/manifest.json` with every file the manifest lists beside it."""
        from shared.artifacts import ArtifactDigestError

        final = self.cache_dir / "dirs" / manifest_sha
        if (final / MANIFEST_NAME).is_file():
            return final / MANIFEST_NAME
        entries = manifest_entries(json.loads(manifest_path.read_bytes()))
        base = rel.rpartition("/")[0]
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{manifest_sha[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            for frel, (sha, size) in sorted(entries.items()):
                src = self.fetch(f"{base}/{frel}" if base else frel, sha, size)
                dst = tmp / frel
                dst.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(src, dst)
                if size is not None and dst.stat().st_size != size:
                    raise ArtifactDigestError(f"{self.location.uri_of(rel)}: {frel} size differs from its manifest")
            link_or_copy(manifest_path, tmp / MANIFEST_NAME)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / MANIFEST_NAME).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same directory first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / MANIFEST_NAME


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to a cached file (no second copy of its bytes), or a copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
