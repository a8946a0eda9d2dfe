"""Data-prep throughput on the standard-library corpus (Python source, no download), and
near-dedup precision/recall on planted pairs around the threshold.

Runs the real pipeline (prepare_dataset) on this interpreter's stdlib .py files (~31 MB) and prints:
- every stage (ingest, filter, exact and near dedup, tokenizer training, tokenize, manifest, and
  what happens outside the stages: discovery, input hashing, what is left of the workers' start
  once hashing is done) with its MB/s, and the
  whole call's wall time and MB/s (target >= 5 MB/s on 2 cores), with the CPU seconds behind it;
- optionally (--cli) the wall time of the real command, `helox data prepare`, in a fresh process;
- an identical re-run: reused after re-verifying every digest, and how long that takes;
- near-dedup precision/recall on planted pairs within +-0.03 of the threshold, deciding on the
  128-permutation estimate (the old behaviour) and on the exact Jaccard (the pipeline's);
- tokenization throughput against a plain single-process sentencepiece encode of the same text;
- semantic-dedup documents/s on a sample (real MiniLM model).

    python benchmarks/data_prep.py                 # the whole stdlib
    python benchmarks/data_prep.py --max-mb 10     # the first 10 MB of it (sorted paths)

Figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.data_prep.planted, when run as a script

from services.data_prep.dedup import lsh_near_duplicates, minhash_signatures
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
from tests.data_prep.planted import planted_near_duplicates

TARGET_MB_S = 5.0
STAGE_ORDER = ("discover", "hash_inputs", "pool_start", "ingest", "filter", "exact_dedup", "near_dedup",
               "semantic_dedup", "tokenizer", "tokenize", "manifest")


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


def forkserver_cpu() -> float:
    """User+system CPU seconds of the multiprocessing forkserver (its preload imports) and of its
    waited-for children (the pipeline's workers, forked from it): 0 before it runs."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def cpu_seconds() -> tuple[float, float]:
    """(this process, the pipeline's worker processes) user+system CPU seconds: the workers are
    forked by the forkserver, which waits for them (its own start-up is counted with them)."""
    time.sleep(0.05)  # the forkserver reaps the workers a pool's join() saw end
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime + forkserver_cpu()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


PARALLEL_STAGES = ("ingest", "near_dedup", "tokenize")  # the stages whose work runs in the worker processes


class StageClock:
    """A progress callback that notes this process's CPU seconds when each stage starts."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.marks or self.marks[-1][0] != stage:
            self.marks.append((stage, time.process_time()))

    def main_cpu(self, start: float, end: float) -> dict[str, float]:
        """Main-process CPU seconds per stage (before the first stage: 'setup'; a stage's time runs to the next's start)."""
        out = {"setup": self.marks[0][1] - start} if self.marks else {}
        ends = [t for _, t in self.marks[1:]] + [end]
        for (stage, t0), t1 in zip(self.marks, ends, strict=True):
            out[stage] = out.get(stage, 0.0) + t1 - t0
        return out


def print_cpu_estimate(main_cpu: dict[str, float], workers_cpu: float, mb: float) -> None:
    """Main-process CPU per stage, and what the wall time would be on 2 idle cores: the serial
    main-process work on one core, the parallel stages' work (workers and main) spread over two."""
    serial = sum(v for k, v in main_cpu.items() if k not in PARALLEL_STAGES)
    parallel = sum(v for k, v in main_cpu.items() if k in PARALLEL_STAGES) + workers_cpu
    estimate = serial + parallel / 2
    print("main-process CPU seconds by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in main_cpu.items())
          + f"; worker processes {workers_cpu:.2f} (their start-up imports included)")
    print(f"estimate for 2 idle cores: serial {serial:.2f} s + parallel {parallel:.2f} CPU-s / 2 = {estimate:.2f} s "
          f"= {mb / estimate:.2f} MB/s (a filter stage's time is counted in ingest: progress marks stage starts)")


def print_stages(result, wall: float, cpu: tuple[float, float]) -> float:
    """The stage table; returns the whole call's MB/s."""
    mb = result.manifest.inputs.bytes / 1e6
    rows: dict[str, tuple[str, str, float, float]] = {}
    for r in result.reports:
        files = f"{r.files_in:,} files" if r.files_in is not None else ""
        rows[r.stage] = (f"{r.docs_in:,}", f"{r.docs_out:,} {files}".strip(), r.bytes_in / 1e6, r.seconds)
    for name, seconds in result.timings.items():
        if name != "total":
            rows[name] = ("", "", mb, seconds)
    print(f"{'stage':<15} {'docs in':>8} {'docs out':>18} {'MB in':>7} {'seconds':>8} {'MB/s':>8} {'share':>6}")
    for name in [n for n in STAGE_ORDER if n in rows] + [n for n in rows if n not in STAGE_ORDER]:
        docs_in, docs_out, mb_in, seconds = rows[name]
        rate = f"{mb_in / seconds:8.1f}" if seconds > 0 else f"{'-':>8}"
        print(f"{name:<15} {docs_in:>8} {docs_out:>18} {mb_in:>7.1f} {seconds:>8.2f} {rate} {seconds / wall:>6.0%}")
    accounted = sum(r[3] for r in rows.values())
    print(f"{'(unaccounted)':<15} {'':>8} {'':>18} {'':>7} {wall - accounted:>8.2f}")
    whole = mb / wall
    print(f"\nwhole call (prepare_dataset): {mb:.1f} MB in {wall:.2f} s = {whole:.2f} MB/s "
          f"(target >= {TARGET_MB_S:.0f} MB/s: {'met' if whole >= TARGET_MB_S else 'NOT met'})")
    print(f"CPU seconds: main process {cpu[0]:.1f}, worker processes {cpu[1]:.1f}; at this load the wall "
          f"time is what the other processes on the machine left us")
    return whole


def time_cli(tmp: Path, cfg: DataPrepConfig) -> tuple[float, str]:
    """Wall seconds of `helox data prepare` (a fresh interpreter, imports included) into a fresh store."""
    import yaml

    data = cfg.model_dump(mode="json")
    run = tmp / "run.yaml"
    run.write_text(yaml.safe_dump({"name": "bench", "corpus": data.pop("corpus"), "data": data}))
    env = {**os.environ, "HELOX_ARTIFACTS": str(tmp / "cli-store"), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("HELOX_REDIS_URL", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "helox.cli", "data", "prepare", str(run)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"helox data prepare failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return wall, out.stdout


def planted_figures(n_pairs: int, threshold: float = 0.8) -> None:
    planted = planted_near_duplicates(n_pairs, threshold, band=0.03, n_background=n_pairs // 2, seed=1)
    sigs = minhash_signatures(planted.texts, ngram=5, num_perm=128, seed=1)
    js = [p.jaccard for p in planted.pairs]
    print(f"\nnear dedup on {len(planted.pairs)} planted pairs with exact Jaccard in [{min(js):.3f}, {max(js):.3f}] "
          f"(threshold {threshold}, {sum(j >= threshold for j in js)} at or above) + {len(planted.background)} "
          "unrelated documents:")
    for label, kwargs in (
        ("estimate, 18x7 bands (before)", {"verify": "estimate", "min_recall": 0.98}),
        ("exact, 18x7 bands", {"texts": planted.texts, "min_recall": 0.98}),
        ("exact, 21x6 bands (the pipeline)", {"texts": planted.texts}),
    ):
        t0 = time.perf_counter()
        near = lsh_near_duplicates(sigs, threshold, **kwargs)
        seconds = time.perf_counter() - t0
        removed = set(np.flatnonzero(~near.keep).tolist())
        p, r, tp, fp, positives = planted.score(removed, near.duplicate_of)
        print(f"  {label:<34} precision {p:.3f} recall {r:.3f} ({tp}/{positives} found, {fp} wrongly removed; "
              f"{near.candidate_pairs} candidates, {seconds:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-mb", type=float, default=None, help="use only the first N MB of stdlib sources")
    ap.add_argument("--workers", type=int, default=2, help="pipeline worker processes (the target is for 2 cores)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--planted-pairs", type=int, default=300, help="planted near-duplicate pairs (0: skip)")
    ap.add_argument("--cli", action="store_true", help="also time `helox data prepare` in a fresh process")
    ap.add_argument("--semantic-sample", type=int, default=256, help="documents for the semantic figure (0: skip)")
    args = ap.parse_args()

    print(f"data-prep benchmark: workers={args.workers}; at start {load()}")
    with tempfile.TemporaryDirectory(prefix="helox-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = DataPrepConfig(
            corpus=corpus_config(tmp, args.max_mb),
            tokenizer=TokenizerConfig(vocab_size=args.vocab_size),
            sharding=ShardingConfig(workers=args.workers),
        )
        store = ArtifactStore(tmp / "store")
        clock = StageClock()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        result = prepare_dataset(cfg, store, clock)
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds()
        m = result.manifest
        print(f"\ncorpus: {m.inputs.files} files, {m.inputs.bytes / 1e6:.1f} MB; dataset {m.version}: "
              f"{m.tokens('train') + m.tokens('val'):,} tokens; {result.status}\n")
        print_stages(result, wall, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]))
        print_cpu_estimate(clock.main_cpu(cpu0[0], cpu1[0]), cpu1[1] - cpu0[1], m.inputs.bytes / 1e6)
        reports = {r.stage: r for r in result.reports}
        near = reports["near_dedup"]
        print(f"near dedup: {near.docs_in / near.seconds:,.0f} docs/s ({near.mb_per_s:.1f} MB/s, "
              f"{near.details['bands']}x{near.details['rows']} bands, {near.details['candidate_pairs']} candidates "
              f"verified exactly, {near.removed} removed, {near.details['estimate_disagreed']} decided differently "
              f"than the estimate would have)")
        print(f"at end of the run: {load()}")

        t0 = time.perf_counter()
        again = prepare_dataset(cfg, store)
        print(f"\nidentical re-run: {again.status} in {time.perf_counter() - t0:.2f} s")

        if args.cli:
            cli_wall, _ = time_cli(tmp, cfg)
            print(f"`helox data prepare` (fresh interpreter, imports and summary included): {cli_wall:.2f} s = "
                  f"{m.inputs.bytes / 1e6 / cli_wall:.2f} MB/s; {load()}")

        if args.planted_pairs:
            planted_figures(args.planted_pairs)

        root = result.manifest_path.parent
        texts = decoded_documents(m, root)
        sp = load_tokenizer(root / m.tokenizer.path)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        t0 = time.perf_counter()
        sp.encode(texts, num_threads=1)
        plain = mb / (time.perf_counter() - t0)
        tok = reports["tokenize"].mb_per_s
        print(f"\ntokenize: pipeline {tok:.2f} MB/s ({args.workers} workers, line by line, shards written and "
              f"hashed) vs plain single-process sentencepiece over whole documents {plain:.2f} MB/s: "
              f"{tok / plain:.2f}x")

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
    print(f"\nat end: {load()}")


if __name__ == "__main__":  # required: the pipeline's worker processes are spawned and import this module
    main()
