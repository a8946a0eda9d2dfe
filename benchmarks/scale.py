"""1 vs N local ranks at the same global batch: tokens/s and loss, through the service's launch path.

Each run is the job the trainer service launches for `train.distributed.nproc` (a JobSpec
read by `services.trainer.job_worker`, the dataset split over ranks by `job.build_trainer`),
without a bus: one process for 1 rank, `torch.distributed.run --standalone` for N (gloo on
CPU, NCCL on GPUs). The dataset: the first MB of the stdlib's .py files through data-prep.

The figures: tokens/s of the fit (result.tokens / wall time, checkpoints included), the final
loss and the largest per-step loss difference from the 1-rank run. The project promises a
sample order that does not depend on the world size, so the difference is rounding only
(the gradient all-reduce sums in another order), ~1e-6 in fp32.

    python benchmarks/scale.py                          # tiny preset, 30 steps, global batch 8, seq 64
    python benchmarks/scale.py --preset 10m --steps 20 --seq-len 128
    python benchmarks/scale.py --nproc 4 --strategy fsdp --threads 1

On a 2-core machine 2 ranks compete with each other (and with anything else running) for the
same cores: tokens/s then measures the cost of the collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.data_prep.pipeline import prepare_dataset
from services.trainer.app import launch_command
from services.trainer.job import train_config_for_manifest
from services.trainer.job_worker import JobSpec, read_result
from shared.artifacts import ArtifactStore
from shared.data.config import CorpusConfig, CorpusSource, DataPrepConfig, ShardingConfig, TokenizerConfig


def build_dataset(tmp: Path, corpus_mb: float, vocab: int) -> Path:
    """The first corpus_mb MB of stdlib .py files (sorted paths), one code domain."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
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
    corpus = CorpusConfig(sources=[CorpusSource(path=str(tmp / "corpus"), domain="code")], roots=[str(tmp), str(stdlib)])
    cfg = DataPrepConfig(corpus=corpus, tokenizer=TokenizerConfig(vocab_size=vocab),
                         sharding=ShardingConfig(val_fraction=0.1, workers=1))
    return prepare_dataset(cfg, ArtifactStore(tmp / "store")).manifest_path


def run(nproc: int, args: argparse.Namespace, manifest: Path, tmp: Path) -> dict:
    train = {
        "model": args.preset, "max_steps": args.steps, "seed": 0, "device": args.device,
        "optim": {"lr": 1e-3, "warmup_steps": max(1, args.steps // 10)},
        "batch": {"global_batch_size": args.global_batch, "micro_batch_size": args.global_batch // nproc,
                  "seq_len": args.seq_len},
        "probes": {"enabled": False}, "eval": {"every": None},
        "log": {"every": args.steps, "structlog": False, "wandb": {"mode": "disabled"}},
        "checkpoint": {"every": None},
        "distributed": {"nproc": nproc, "strategy": args.strategy if nproc > 1 else "auto", "zero": args.zero,
                        "cpu_offload": args.cpu_offload},
    }
    cfg = train_config_for_manifest(train, manifest)
    work = tmp / f"job-{nproc}"
    work.mkdir()
    spec = JobSpec(train=cfg.model_dump(mode="json"), manifest_path=str(manifest), out_dir=str(work / "run"),
                   run_id=f"scale-{nproc}", work_dir=str(work), artifacts=str(tmp / "store"))
    (work / "spec.json").write_text(spec.model_dump_json())
    cmd = (launch_command(nproc, work / "spec.json") if nproc > 1
           else [sys.executable, "-m", "services.trainer.job_worker", str(work / "spec.json")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    body = read_result(work)
    if proc.returncode != 0 or body is None or body["outcome"] != "finished":
        raise SystemExit(f"{nproc}-rank run failed (exit {proc.returncode}): {body}\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-3000:]}")
    r = body["result"]
    losses = {int(k): v for k, v in r["losses"].items()}
    return {"nproc": nproc, "tokens": r["tokens"], "fit_s": r["wall_time_s"], "process_s": wall,
            "tokens_per_s": r["tokens"] / r["wall_time_s"], "losses": losses, "final_loss": r["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2, help="Ranks of the run compared with 1.")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--zero", action="store_true", help="ZeroRedundancyOptimizer (DDP).")
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank.")
    ap.add_argument("--corpus-mb", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = ap.parse_args()
    if args.global_batch % args.nproc:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --nproc {args.nproc}")

    with tempfile.TemporaryDirectory(prefix="helox-scale-") as d:
        tmp = Path(d)
        manifest = build_dataset(tmp, args.corpus_mb, args.vocab)
        print(f"setup: preset {args.preset}, {args.steps} steps, global batch {args.global_batch} x seq "
              f"{args.seq_len}, {args.strategy}{' +zero' if args.zero else ''}"
              f"{' +cpu_offload' if args.cpu_offload else ''}, device {args.device}, {args.threads} thread(s)/rank, "
              f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")
        one = run(1, args, manifest, tmp)
        many = run(args.nproc, args, manifest, tmp)
    diff = max(abs(many["losses"][s] - v) for s, v in one["losses"].items())
    for r in (one, many):
        print(f"{r['nproc']} rank(s): {r['tokens_per_s']:8.0f} tokens/s ({r['tokens']} tokens in {r['fit_s']:.1f} s of "
              f"fit, {r['process_s']:.1f} s with start-up), final loss {r['final_loss']:.6f}")
    print(f"ratio {args.nproc}/1: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s; "
          f"max |loss difference| over {len(one['losses'])} steps: {diff:.2e} (same samples, summed in another order)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "one": one,
                                         "many": many, "max_loss_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
