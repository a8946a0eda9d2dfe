"""Evaluator throughput on a stdlib dataset (Python code + docstrings, no download).

Builds a dataset from the first --corpus-mb MB of this interpreter's stdlib sources (domains
code and docs), writes K checkpoints of the tiny preset, and prints:
- validation tokens/s of the held-out pass (1 thread, and every thread);
- the wall time of a queue of K checkpoints fully evaluated (held-out, default suites, parity)
  by 1 worker process vs 2, each with one torch thread and its share of the queue, and the
  ratio (target >= 1.7x on 2 cores). Timing starts once the workers are up (imports and the
  tokenizer load are a service's start-up cost, paid once): it is printed apart.
- the extra cost of a paired comparison against a previous-best checkpoint (scored once, then
  served from the reference cache).

Claim-to-result latency over the bus (XREADGROUP to EvaluationCompleted) belongs to the bus
benchmark, not this one.

    python benchmarks/evaluator.py                      # K=8, 1 MB of stdlib
    python benchmarks/evaluator.py --checkpoints 4 --max-val-tokens 8000

Figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.data_prep.pipeline import prepare_dataset
from services.evaluator.config import EvalConfig
from services.evaluator.evaluate import clear_cache, evaluate_checkpoint
from services.evaluator.heldout import heldout_metrics
from shared.artifacts import ArtifactStore
from shared.checkpoint import save_checkpoint
from shared.data.config import (
    CorpusConfig,
    CorpusSource,
    DataPrepConfig,
    ShardingConfig,
    TokenizerConfig,
    stdlib_dir,
)
from shared.data.manifest import load_manifest
from shared.model import Llama, model_preset

TARGET_RATIO = 1.7


def build_dataset(tmp: Path, corpus_mb: float, vocab: int) -> Path:
    """The first corpus_mb MB of stdlib .py files (sorted paths), as code and docstring domains."""
    stdlib = Path(stdlib_dir())
    budget = corpus_mb * 1e6
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] == "site-packages" or "__pycache__" in rel.parts:
            continue
        link = tmp / "corpus" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        budget -= path.stat().st_size
        if budget <= 0:
            break
    corpus = CorpusConfig(
        sources=[CorpusSource(path=str(tmp / "corpus"), domain="code"),
                 CorpusSource(path=str(tmp / "corpus"), domain="docs", docstrings=True)],
        roots=[str(tmp), str(stdlib)],
    )
    cfg = DataPrepConfig(corpus=corpus, tokenizer=TokenizerConfig(vocab_size=vocab),
                         sharding=ShardingConfig(val_fraction=0.1, workers=1))
    return prepare_dataset(cfg, ArtifactStore(tmp / "store")).manifest_path


def write_checkpoints(root: Path, manifest: Path, k: int) -> list[Path]:
    m = load_manifest(manifest)
    cfg = model_preset("tiny", vocab_size=m.tokenizer.vocab_size)
    paths = []
    for i in range(k):
        torch.manual_seed(i)
        model = Llama(cfg)
        info = save_checkpoint(root, (i + 1) * 100, model.state_dict(), {"model_config": cfg.model_dump(mode="json")},
                               meta={"dataset_version": m.version, "reason": "interval"})
        paths.append(info.path)
    return paths


def _worker(share: list[str], manifest: str, config_json: str, out_root: str, ready, go, results) -> None:
    torch.set_num_threads(1)
    config = EvalConfig.model_validate_json(config_json)
    t0 = time.perf_counter()
    from services.evaluator.evaluate import _context

    _context(manifest, config)  # tokenizer + suites: the start-up cost of a service instance
    startup = time.perf_counter() - t0
    ready.put(startup)
    go.wait()
    started = time.time()
    for path in share:
        evaluate_checkpoint(path, manifest, config, out_dir=Path(out_root) / Path(path).name)
    results.put((started, time.time(), len(share)))


def run_queue(paths: list[Path], manifest: Path, config: EvalConfig, out_root: Path, workers: int
              ) -> tuple[float, float]:
    """(wall seconds from release to the last result, max worker start-up seconds)."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [[str(p) for p in paths[w::workers]] for w in range(workers)]
    procs = [ctx.Process(target=_worker, args=(s, str(manifest), config.model_dump_json(), str(out_root / f"w{w}"),
                                               ready, go, results)) for w, s in enumerate(shares)]
    for p in procs:
        p.start()
    startup = max(ready.get(timeout=300) for _ in procs)
    t0 = time.time()
    go.set()
    ends = [results.get(timeout=1800)[1] for _ in procs]
    for p in procs:
        p.join()
    return max(ends) - t0, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=8, help="K: checkpoints in the queue")
    ap.add_argument("--corpus-mb", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--max-val-tokens", type=int, default=16_000, help="validation tokens per domain per eval")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    print(f"evaluator benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="helox-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        manifest = build_dataset(tmp, args.corpus_mb, args.vocab_size)
        m = load_manifest(manifest)
        print(f"dataset: {args.corpus_mb} MB of stdlib -> {m.tokens('train')} train / {m.tokens('val')} val tokens, "
              f"domains {m.domain_names}, vocab {m.tokenizer.vocab_size} ({time.perf_counter() - t0:.1f} s)")
        paths = write_checkpoints(tmp / "ckpts", manifest, args.checkpoints)
        config = EvalConfig(seq_len=args.seq_len, max_val_tokens=args.max_val_tokens, batch_size=16)

        # held-out throughput, in process
        model = Llama(model_preset("tiny", vocab_size=m.tokenizer.vocab_size)).eval()
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            heldout_metrics(model, manifest, batch_size=16, seq_len=args.seq_len, max_tokens=2048)  # warm-up
            res = heldout_metrics(model, manifest, batch_size=16, seq_len=args.seq_len, max_tokens=args.max_val_tokens)
            print(f"held-out pass, tiny preset ({model.num_params() / 1e6:.2f} M params), seq {args.seq_len}, batch 16, "
                  f"{threads} thread(s): {res.tokens} tokens in {res.seconds:.2f} s = {res.tokens_per_s:,.0f} tokens/s")
        torch.set_num_threads(1)

        # one full evaluation, broken down
        clear_cache()
        rep = evaluate_checkpoint(paths[0], manifest, config, out_dir=tmp / "one")
        t = rep.timings
        print(f"one evaluation (1 thread): {t['total_s']:.2f} s = held-out {t['heldout_s']:.2f} + suites "
              f"{t['suites_s']:.2f} + parity {t.get('parity_s', 0):.2f} + load {t['load_s']:.2f}")
        rep = evaluate_checkpoint(paths[1], manifest, config, previous_best=paths[0], out_dir=tmp / "two")
        print(f"with a previous-best comparison (reference cached): {rep.timings['total_s']:.2f} s "
              f"(references {rep.timings['references_s']:.3f} s, verdict {rep.verdict})")
        clear_cache()
        rep = evaluate_checkpoint(paths[1], manifest, config, previous_best=paths[2], out_dir=tmp / "three")
        print(f"with a previous-best comparison (reference scored): {rep.timings['total_s']:.2f} s "
              f"(references {rep.timings['references_s']:.2f} s)")

        # the queue: 1 vs 2 worker processes, one thread each
        walls = {}
        for workers in (1, 2):
            wall, startup = run_queue(paths, manifest, config, tmp / f"queue{workers}", workers)
            walls[workers] = wall
            print(f"queue of {len(paths)} checkpoints, {workers} worker(s) x 1 thread: {wall:.2f} s "
                  f"({len(paths) / wall:.2f} checkpoints/s; worker start-up {startup:.2f} s, not counted)")
        ratio = walls[1] / walls[2]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(f"speed-up 2 workers vs 1: {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target); "
              f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
