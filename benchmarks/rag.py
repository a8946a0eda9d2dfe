"""RAG-aware training: the local retriever's speed against bm25s itself, and packing throughput.

On the corpus of configs/rag.yaml (a few stdlib packages, no download) it prints:
- local BM25: queries/s of shared.retrieval.LocalIndex.search (contract results, exclusions
  applied) against bm25s called directly (tokenize + retrieve, the same queries and k), and the
  ratio (target >= 0.8x); once without exclusions, once excluding each query's own document;
- packing: the whole retrieval stage of data prep (windows, queries, leakage rule, packing, the
  packed shards written) in MB of base text per second, and pack_record alone (MB/s).

    python benchmarks/rag.py [--queries 2000] [--rounds 7]

Each figure is one function of SECTIONS, run in order with the shared `Setup`: the retrieval
gain (evaluator) and Cyrex-over-Synapse (Cyrex) sections are meant to be added there.
Figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contracts import RetrievalQuery
from shared.retrieval.packing import Layout, pack_record
from services.data_prep.pipeline import PrepareResult, prepare_dataset
from services.data_prep.tokenizer import load_tokenizer
from shared.artifacts import ArtifactStore
from shared.data.config import DataPrepConfig, data_prep_config
from shared.retrieval import LocalIndex
from shared.retrieval.local import tokenize_queries

TARGET_RATIO = 0.8


@dataclass
class Setup:
    config: DataPrepConfig
    result: PrepareResult  # the packed dataset (local retriever)
    index: LocalIndex  # its saved index, loaded back
    queries: list[RetrievalQuery]  # window-like queries: a chunk's text, its own document excluded
    args: argparse.Namespace


def build(args: argparse.Namespace, tmp: Path) -> Setup:
    raw = yaml.safe_load((REPO / "configs" / "rag.yaml").read_text())
    raw["data"]["rag"]["retriever"] = "local"
    config = data_prep_config(raw["corpus"], raw["data"])
    result = prepare_dataset(config, ArtifactStore(tmp / "store"))
    rag = result.manifest.rag
    index = LocalIndex.load(result.manifest_path.parent / rag.index.path, rag.index.sha256)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(index.chunks), size=min(args.queries, len(index.chunks)), replace=False)
    k = min(2 * config.rag.k, 256)
    queries = [RetrievalQuery(query_id=str(i), text=index.chunks[i].text[: config.rag.query_chars], k=k,
                              exclude_source_ids=[index.chunks[i].source_id]) for i in picks.tolist()]
    return Setup(config, result, index, queries, args)


def paired(ours: Callable[[], object], direct: Callable[[], object], n: int, rounds: int) -> tuple[float, float, float]:
    """(ours q/s, direct q/s, ours/direct): medians over alternating rounds, so that the load of a
    shared machine hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        for fn, out in ((ours, a), (direct, b)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    ratio = float(np.median([y / x for x, y in zip(a, b, strict=True)]))
    return n / float(np.median(a)), n / float(np.median(b)), ratio


def local_bm25(s: Setup) -> None:
    batch = s.config.rag.batch_queries
    plain = [q.model_copy(update={"exclude_source_ids": []}) for q in s.queries]

    def ours(qs: list[RetrievalQuery]) -> Callable[[], None]:
        return lambda: [s.index.search(qs[i : i + batch]) for i in range(0, len(qs), batch)]

    def direct(depth: int) -> Callable[[], None]:
        texts = [q.text for q in s.queries]
        return lambda: [s.index.bm25.retrieve(tokenize_queries(texts[i : i + batch]), k=depth, show_progress=False,
                                              n_threads=1) for i in range(0, len(texts), batch)]

    k = s.queries[0].k
    n = len(s.queries)
    print(f"local BM25 over {len(s.index.chunks):,} chunks of {s.index.documents} documents "
          f"(bm25s {bm25s.__version__}), {n} queries in batches of {batch}, k={k}")
    mine, base, ratio = paired(ours(plain), direct(k), n, s.args.rounds)
    print(f"  no exclusions:       LocalIndex {mine:8.0f} q/s   bm25s direct {base:8.0f} q/s   "
          f"ratio {ratio:.2f}x (target >= {TARGET_RATIO}x; median of {s.args.rounds} paired rounds)")
    # Excluding the own document makes LocalIndex ask bm25s for k + that document's chunks; the fair
    # direct baseline asks for the same depth (and does not filter).
    per_source: dict[str, int] = {}
    for c in s.index.chunks:
        per_source[c.source_id] = per_source.get(c.source_id, 0) + 1
    depth = min(len(s.index.chunks), k + max(per_source[q.exclude_source_ids[0]] for q in s.queries[:batch]))
    mine_x, base_x, ratio_x = paired(ours(s.queries), direct(depth), n, s.args.rounds)
    print(f"  own doc excluded:    LocalIndex {mine_x:8.0f} q/s   bm25s direct {base_x:8.0f} q/s   "
          f"ratio {ratio_x:.2f}x (direct at depth {depth}, no filtering)")


def packing(s: Setup) -> None:
    stage = next(r for r in s.result.reports if r.stage == "retrieval")
    rag = s.result.manifest.rag
    print(f"retrieval stage: {sum(rag.windows.values()):,} windows of {rag.seq_len} tokens, "
          f"{stage.bytes_in / 1e6:.2f} MB of base text in {stage.seconds:.2f} s = "
          f"{stage.bytes_in / 1e6 / stage.seconds:.2f} MB/s (index, queries, leakage rule, packing, shards)")
    sp = load_tokenizer(s.result.manifest_path.parent / s.result.manifest.tokenizer.path)
    layout = Layout.of(rag.seq_len, rag.context_budget, rag.boundary_ids, 0)
    chunks = [sp.encode(c.text) for c in s.index.chunks[:3000]]
    rng = np.random.default_rng(1)
    base = np.asarray(sp.encode("\n".join(c.text for c in s.index.chunks[:3000])), dtype=np.int64)
    windows = [base[i : i + layout.base_tokens] for i in range(0, len(base) - layout.base_tokens, layout.base_tokens)]
    picks = [[chunks[j] for j in rng.integers(0, len(chunks), s.config.rag.k)] for _ in windows]
    text_bytes = sum(len(c.text.encode()) for c in s.index.chunks[:3000])
    t = time.perf_counter()
    for w, p in zip(windows, picks, strict=True):
        pack_record(layout, w, p)
    dt = time.perf_counter() - t
    print(f"pack_record alone: {len(windows):,} records in {dt:.3f} s = {text_bytes / 1e6 / dt:.2f} MB/s of base text")


SECTIONS: list[Callable[[Setup], None]] = [local_bm25, packing]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7, help="Alternating rounds of the q/s comparison.")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as d:
        setup = build(args, Path(d))
        for section in SECTIONS:
            section(setup)


if __name__ == "__main__":
    main()
