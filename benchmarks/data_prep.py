"""Data-prep throughput on the standard-library corpus (Python source, no download).

Runs the real pipeline (prepare_dataset) on this interpreter's stdlib .py files and prints:
- MB/s of every stage and end to end over exact dedup + near dedup + tokenize (target >= 5 MB/s);
- tokenization throughput against a plain single-process sentencepiece encode of the same text;
- near-dedup documents/s, and semantic-dedup documents/s on a sample (real MiniLM model).

    python benchmarks/data_prep.py                 # the whole stdlib
    python benchmarks/data_prep.py --max-mb 10     # the first 10 MB of it (sorted paths)

Figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from services.data_prep.pipeline import prepare_dataset
from services.data_prep.tokenizer import EOS_ID, load_tokenizer
from shared.artifacts import ArtifactStore
from shared.data.config import (
    STDLIB_EXCLUDE,
    CorpusConfig,
    CorpusSource,
    DataPrepConfig,
    ShardingConfig,
    TokenizerConfig,
    stdlib_dir,
)
from shared.data.manifest import Manifest

E2E_STAGES = ("exact_dedup", "near_dedup", "tokenize")
TARGET_MB_S = 5.0


def corpus_config(tmp: Path, max_mb: float | None) -> CorpusConfig:
    """The stdlib sources, or a prefix of them (symlinked into tmp) when max_mb is given."""
    stdlib = Path(stdlib_dir())
    if max_mb is None:
        return CorpusConfig(
            sources=[CorpusSource(path="{stdlib}/**/*.py", domain="code", exclude=STDLIB_EXCLUDE)],
            roots=["{stdlib}"],
        )
    budget, picked = max_mb * 1e6, []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] == "site-packages" or "__pycache__" in rel.parts:
            continue
        picked.append(rel)
        budget -= path.stat().st_size
        if budget <= 0:
            break
    for rel in picked:
        link = tmp / "corpus" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(stdlib / rel)
    return CorpusConfig(
        sources=[CorpusSource(path=str(tmp / "corpus"), domain="code")], roots=[str(tmp), str(stdlib)]
    )


def decoded_documents(manifest: Manifest, root: Path) -> list[str]:
    """The documents the tokenize stage encoded, decoded back from the shards (exact round trip)."""
    sp = load_tokenizer(root / manifest.tokenizer.path)
    texts = []
    for shard in manifest.shards:
        tokens = np.fromfile(root / shard.path, dtype=shard.dtype)
        ends = np.flatnonzero(tokens == EOS_ID)
        starts = np.concatenate(([0], ends[:-1] + 1))
        texts.extend(sp.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True))
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-mb", type=float, default=None, help="use only the first N MB of stdlib sources")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="pipeline worker processes")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--semantic-sample", type=int, default=256, help="documents for the semantic figure (0: skip)")
    args = ap.parse_args()

    print(f"data-prep benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
          f"workers={args.workers}")
    with tempfile.TemporaryDirectory(prefix="helox-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = DataPrepConfig(
            corpus=corpus_config(tmp, args.max_mb),
            tokenizer=TokenizerConfig(vocab_size=args.vocab_size),
            sharding=ShardingConfig(workers=args.workers),
        )
        t0 = time.perf_counter()
        result = prepare_dataset(cfg, ArtifactStore(tmp / "store"))
        wall = time.perf_counter() - t0
        reports = {r.stage: r for r in result.reports}

        print(f"\ncorpus: {result.manifest.inputs.files} files, {result.manifest.inputs.bytes / 1e6:.1f} MB; "
              f"dataset {result.manifest.version}: {result.manifest.tokens('train') + result.manifest.tokens('val'):,} "
              f"tokens\n")
        print(f"{'stage':<14} {'docs in':>8} {'docs out':>8} {'MB in':>8} {'seconds':>8} {'MB/s':>8}")
        for r in result.reports:
            print(f"{r.stage:<14} {r.docs_in:>8,} {r.docs_out:>8,} {r.bytes_in / 1e6:>8.1f} {r.seconds:>8.2f} "
                  f"{r.mb_per_s:>8.1f}")
        e2e_seconds = sum(reports[s].seconds for s in E2E_STAGES)
        e2e_mb = reports["exact_dedup"].bytes_in / 1e6
        e2e = e2e_mb / e2e_seconds
        near = reports["near_dedup"]
        print(f"\nend to end (exact + near dedup + tokenize): {e2e_mb:.1f} MB in {e2e_seconds:.2f} s = {e2e:.2f} MB/s "
              f"(target >= {TARGET_MB_S:.0f}: {'met' if e2e >= TARGET_MB_S else 'NOT met'})")
        print(f"whole pipeline incl. ingest and tokenizer training: {wall:.2f} s")
        print(f"near dedup: {near.docs_in / near.seconds:,.0f} docs/s ({near.mb_per_s:.1f} MB/s, "
              f"{near.details['bands']}x{near.details['rows']} bands, {near.removed} removed)")

        root = result.manifest_path.parent
        texts = decoded_documents(result.manifest, root)
        sp = load_tokenizer(root / result.manifest.tokenizer.path)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        t0 = time.perf_counter()
        sp.encode(texts, num_threads=1)
        plain = mb / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        sp.encode(texts)
        threaded = mb / (time.perf_counter() - t0)
        tok = reports["tokenize"].mb_per_s
        print(f"tokenize: pipeline {tok:.2f} MB/s (workers, shards written and hashed) vs plain single-process "
              f"sentencepiece {plain:.2f} MB/s: ratio {tok / plain:.2f}x (sentencepiece's own threads: "
              f"{threaded:.2f} MB/s)")

        if args.semantic_sample:
            from services.data_prep.semantic import embed, load_embedder, semantic_duplicates

            t0 = time.perf_counter()
            model = load_embedder("all-MiniLM-L6-v2")
            load_s = time.perf_counter() - t0
            sample = texts[: args.semantic_sample]
            t0 = time.perf_counter()
            emb = embed(model, sample)
            embed_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            sem = semantic_duplicates(emb, n_clusters=max(1, len(sample) // 32), threshold=0.95)
            cluster_s = time.perf_counter() - t1
            print(f"semantic dedup: {len(sample) / (embed_s + cluster_s):.1f} docs/s on {len(sample)} docs "
                  f"(embedding {embed_s:.2f} s, k-means + pairs {cluster_s:.3f} s, model load {load_s:.1f} s, "
                  f"{int((~sem.keep).sum())} removed)")


if __name__ == "__main__":  # required: the pipeline's worker processes are spawned and import this module
    main()
