"""RAG-aware training: the local retriever's speed against bm25s itself, and packing throughput.

On the corpus of configs/rag.yaml (a few stdlib packages, no download) it prints:
- local BM25: queries/s of shared.retrieval.LocalIndex.search (contract results, exclusions
  applied) against bm25s called directly (tokenize + retrieve, the same queries and k), and the
  ratio (target >= 0.8x); once without exclusions, once excluding each query's own document;
- packing: the whole retrieval stage of data prep (windows, queries, leakage rule, packing, the
  packed shards written) in MB of base text per second, and pack_record alone (MB/s);
- Cyrex over Synapse: queries/s of a real `python -m cyrex_example serve` process (the reference
  Cyrex, its own BM25 over the same stdlib files) answering RetrievalRequested batches sent by
  shared.retrieval's SynapseRetriever through a real redis-server (shared.redis_server), against
  the local index on the same queries and batches, and the ratio;
- retrieval gain: a tiny model trained (the project's Trainer, services.trainer.job.build_trainer,
  the train section of configs/rag.yaml for --train-steps steps) on the RAG-packed dataset, then
  the evaluator's retrieval gain on its final checkpoint: loss of the validation base tokens without
  context, with the retrieved chunks and with random chunks of equal length (the control), in
  nats/token and bits/byte, and whether the gain beats the control; and the rag_stdlib suite
  (retrieval-conditioned items) with and without context.

    python benchmarks/rag.py [--queries 2000] [--rounds 7] [--cyrex-queries 512] [--train-steps 300]
                             [--sections local_bm25,packing,cyrex_synapse,retrieval_gain]

Each figure is one function of SECTIONS, run in order with the shared `Setup`. Bounded: about
8 minutes on 2 idle cores with the defaults (the training dominates; --train-steps scales it).
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
from services.data_prep.pipeline import PrepareResult, prepare_dataset
from services.data_prep.tokenizer import load_tokenizer
from shared.artifacts import ArtifactStore
from shared.data.config import DataPrepConfig, data_prep_config
from shared.retrieval import LocalIndex
from shared.retrieval.local import tokenize_queries
from shared.retrieval.packing import Layout, pack_record

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


def _stdlib_collection(s: Setup, root: Path) -> tuple[Path, int]:
    """The .py files of the corpus's stdlib packages (its code sources, `{stdlib}` expanded),
    copied under ROOT: the documents data prep read, as files, for Cyrex to index."""
    import glob
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    files = 0
    for src in s.config.corpus.sources:
        if src.docstrings:
            continue  # the docstrings domain is derived from the same files
        for name in sorted(glob.glob(src.path.replace("{stdlib}", stdlib), recursive=True)):
            f = Path(name)
            dest = root / f.relative_to(stdlib)
            if f.is_file() and not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
                files += 1
    return root, files


def cyrex_synapse(s: Setup) -> None:
    import signal
    import subprocess

    from contracts import Producer
    from shared.redis_server import RedisServer
    from shared.retrieval import SynapseLink, SynapseRetriever, discover

    batch = s.config.rag.batch_queries
    k = s.config.rag.k
    queries = [q.model_copy(update={"exclude_source_ids": [], "k": k}) for q in s.queries[: s.args.cyrex_queries]]
    batches = [queries[i : i + batch] for i in range(0, len(queries), batch)]
    tmp = Path(s.args.tmp)
    collection, n_files = _stdlib_collection(s, tmp / "collection")
    with RedisServer(tmp / "redis") as server:
        log = open(tmp / "cyrex.log", "wb")  # noqa: SIM115 - closed below
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        env.pop("HELOX_SIGNING_KEY", None)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "cyrex_example", "serve", "--collection", str(collection),
                                 "--redis-url", server.url, "--instance", "cyrex-bench", "--max-k", str(max(16, k)),
                                 "--heartbeat-s", "0.5", "--retrieval-only"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            link = SynapseLink(server.url, "helox.", Producer(service="benchmark", instance="bench-rag-1"))
            found = discover(link, timeout_s=180)
            if found is None:
                raise SystemExit(f"cyrex_example serve announced no ready retriever in 180 s; see {tmp / 'cyrex.log'}")
            ready_s = time.perf_counter() - t0
            retriever = SynapseRetriever(link, found, request_timeout_s=60)
            retriever.ask(batches[:1])  # warm: connections, first XREAD
            remote, local = [], []
            answered = failed = 0
            for _ in range(s.args.rounds):
                t = time.perf_counter()
                answers = retriever.ask(batches)
                remote.append(time.perf_counter() - t)
                answered = sum(len(a.results) for a in answers)
                failed = sum(len(a.failed) for a in answers)
                t = time.perf_counter()
                for b in batches:
                    s.index.search(b)
                local.append(time.perf_counter() - t)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    n = len(queries)
    cyrex_qps, local_qps = n / float(np.median(remote)), n / float(np.median(local))
    ratio = float(np.median([lo / re for re, lo in zip(remote, local, strict=True)]))
    print(f"Cyrex over Synapse: cyrex_example serve over {n_files} stdlib files ({found.index_documents}"
          f" documents, {found.index_chunks} chunks, ready in {ready_s:.1f} s), {n} queries in batches "
          f"of {batch}, k={k}, {retriever.max_in_flight} requests in flight")
    print(f"  Cyrex/Synapse {cyrex_qps:8.0f} q/s   local index {local_qps:8.0f} q/s   ratio {ratio:.3f}x "
          f"(Cyrex / local; median of {s.args.rounds} paired rounds; {answered} answered, {failed} failed)")


def retrieval_gain_section(s: Setup) -> None:
    import torch

    from services.evaluator.config import DEFAULT_SUITES_DIR, EvalConfig
    from services.evaluator.heldout import dataset_tokenizer
    from services.evaluator.retrieval_gain import LN2, RagPrompter, format_retrieval, retrieval_gain
    from services.evaluator.suites import load_suite, run_suite
    from services.trainer.job import build_trainer, train_config_for_manifest
    from shared.checkpoint import load_model
    from shared.logging import configure_logging

    configure_logging("benchmark", "bench-rag", level="warning")  # the trainer's per-step log lines off
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    raw = yaml.safe_load((REPO / "configs" / "rag.yaml").read_text())
    train = raw["train"]
    steps = s.args.train_steps
    train["max_steps"] = steps
    train["optim"]["warmup_steps"] = min(train["optim"].get("warmup_steps", 0), max(1, steps // 10))
    train["curriculum"]["seq_len_warmup_steps"] = min(train["curriculum"]["seq_len_warmup_steps"], max(1, steps // 5))
    train["checkpoint"] = {"every": steps, "keep_last": 1}
    train["eval"] = {"every": steps, "batches": 2}
    train["log"] = {"every": max(1, steps // 5), "wandb": {"mode": "disabled"}}
    manifest = s.result.manifest_path
    cfg = train_config_for_manifest(train, manifest)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, manifest, Path(s.args.tmp) / "run", run_id="bench-rag")
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    if result.last_checkpoint is None:
        raise SystemExit(f"training ended without a checkpoint ({result.status})")
    model, _ = load_model(result.last_checkpoint)
    model.eval()
    sp = dataset_tokenizer(manifest)
    print(f"retrieval gain: model {train.get('model')} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"params) trained {result.final_step} steps in {train_s:.0f} s on the packed dataset, loss "
          f"{result.final_loss:.3f}; checkpoint {result.last_checkpoint.name}")
    t = time.perf_counter()
    figures, note = retrieval_gain(model, manifest, sp, max_windows=s.args.gain_windows or None, batch_size=16, seed=0)
    assert figures is not None, note
    print(f"  {note}; {time.perf_counter() - t:.1f} s")
    print(f"  {format_retrieval(figures)}")
    print(f"  gain {figures['gain']:+.4f} nats/token = {figures['gain_bpb']:+.4f} bits/byte; control gain "
          f"{figures['control_gain']:+.4f} nats/token = {figures['control_gain_bpb']:+.4f} bits/byte; "
          f"gain > control: {figures['gain'] > figures['control_gain']} "
          f"({(figures['gain'] - figures['control_gain']) / LN2:+.4f} bits/token beyond the control)")
    rag, rag_note = RagPrompter.of(manifest, sp)
    suite = load_suite(DEFAULT_SUITES_DIR / "rag_stdlib.yaml")
    res = run_suite(model, sp, suite, EvalConfig(suites_dir=None), eos_id=s.result.manifest.tokenizer.eos_id,
                    rag=rag, rag_note=rag_note)
    r = res.retrieval or {}
    print(f"  suite rag_stdlib ({res.n} retrieval items, {len(res.skipped)} skipped): score with context "
          f"{r.get('score_with', float('nan')):.3f}, without {r.get('score_without', float('nan')):.3f}, "
          f"gain {r.get('gain', float('nan')):+.3f}")


SECTIONS: list[Callable[[Setup], None]] = [local_bm25, packing, cyrex_synapse, retrieval_gain_section]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7, help="Alternating rounds of the q/s comparison.")
    ap.add_argument("--cyrex-queries", type=int, default=512, help="Queries sent to Cyrex per round.")
    ap.add_argument("--train-steps", type=int, default=300, help="Training steps of the retrieval-gain model.")
    ap.add_argument("--gain-windows", type=int, default=256,
                    help="Validation windows of the retrieval gain (spread over the split; 0: all).")
    ap.add_argument("--sections", default=",".join(f.__name__ for f in SECTIONS),
                    help="Comma-separated sections to run, in order.")
    args = ap.parse_args()
    chosen = [f for name in args.sections.split(",") for f in SECTIONS if f.__name__ == name.strip()]
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        args.tmp = d
        setup = build(args, Path(d))
        for section in chosen:
            section(setup)
    print(f"total {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
