"""Validation bits per byte after a fixed CPU budget: Muon (+ AdamW for the rest) vs AdamW.

Same model, data, batches, seed and budget for every run; only the optimizer and its LR
change. The data is the demo's (configs/demo.yaml: the Python standard library's sources
and docstrings), prepared once into --artifacts and reused. Each run:

- trains the demo's `train` section with `optim.name` and `lr` (AdamW's) or `muon.lr` set,
  checkpoints, probes and W&B off;
- stops when the process has used --budget CPU seconds (CPU time, not wall: the machine is
  shared; one intra-op thread, so CPU time is the run's own work). The cosine schedule is
  sized to the budget: a 10-step calibration measures each optimizer's CPU time per step, and
  max_steps = budget / that, so each run ends its decay when its budget ends;
- is scored on the whole validation split (up to --val-tokens) by the evaluator's
  `heldout_metrics`: bits per byte. Along the way the same score every --eval-every steps (its
  CPU time off the budget) gives the time at which a run first reached the best AdamW run's
  final bpb.

First a sweep of LRs for each optimizer (printed), then the best of each side by side:
bpb at equal CPU time and the ratio; time for Muon to reach AdamW's final bpb and the ratio.
Targets (issue 16): Muon bpb <= 0.9x AdamW's, or AdamW's bpb in <= 0.7x the time.

    python benchmarks/time_to_loss.py                      # 60 CPU-s per run, 4 AdamW LRs, 3 Muon LRs
    python benchmarks/time_to_loss.py --budget 20 --adamw-lrs 2e-3 --muon-lrs 0.02   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helox.runconfig import load_run_config
from services.data_prep.pipeline import prepare_dataset
from services.evaluator.heldout import heldout_metrics
from services.trainer.hooks import Callback
from services.trainer.job import build_trainer, train_config_for_manifest
from shared.artifacts import ArtifactStore
from shared.data.config import data_prep_config

REPO = Path(__file__).resolve().parents[1]


class Budget(Callback):
    """Stops the run once the process has spent `seconds` of CPU time on training since train_start;
    every `every` steps scores the model (`score`: validation bpb), off the clock, and records
    (cpu seconds, step, bpb)."""

    def __init__(self, seconds: float, score=None, every: int = 0) -> None:
        self.seconds, self.score, self.every = seconds, score, every
        self.t0, self.off, self.evals = 0.0, 0.0, []

    def used(self) -> float:
        return time.process_time() - self.t0 - self.off

    def on_train_start(self, trainer, resumed_from=None) -> None:
        self.t0 = time.process_time()

    def on_step_end(self, trainer, result) -> None:
        if self.score is not None and self.every and result.step % self.every == 0:
            t = time.process_time()
            model = trainer.raw_model
            self.evals.append((self.used(), result.step, self.score(model)))
            model.train()
            self.off += time.process_time() - t
        if self.used() >= self.seconds:
            trainer.request_stop()


def _train_section(base: dict[str, Any], optimizer: str, lr: float, max_steps: int, eval_every: int) -> dict:
    train = {k: v for k, v in base.items() if k not in ("checkpoint", "probes", "log", "eval")}
    optim = dict(train.get("optim", {}))
    optim["name"] = optimizer
    if optimizer == "muon":
        optim["muon"] = {**optim.get("muon", {}), "lr": lr}
    else:
        optim["lr"] = lr
    optim["warmup_steps"] = min(optim.get("warmup_steps", 0), max(max_steps // 10, 1))
    return {**train, "optim": optim, "max_steps": max_steps, "checkpoint": {"every": None},
            "probes": {"enabled": False}, "eval": {"every": None},
            "log": {"every": 10_000, "structlog": False, "wandb": {"mode": "disabled"}}}


def _run(base: dict, manifest: Path, optimizer: str, lr: float, budget: float, max_steps: int, eval_every: int,
         val_tokens: int) -> dict[str, Any]:
    tcfg = train_config_for_manifest(_train_section(base, optimizer, lr, max_steps, eval_every), manifest)

    def bpb(model) -> float:
        h = heldout_metrics(model, manifest, batch_size=8, seq_len=tcfg.batch.seq_len, max_tokens=val_tokens)
        return h.metrics()["bits_per_byte"]

    watch = Budget(budget, bpb, eval_every)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(tcfg, manifest, Path(out), callbacks=[watch])
        wall0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - wall0
        cpu = watch.used()
        model = trainer.raw_model.eval()
        h = heldout_metrics(model, manifest, batch_size=8, seq_len=tcfg.batch.seq_len, max_tokens=val_tokens)
    return {"optimizer": optimizer, "lr": lr, "steps": result.final_step, "cpu_s": cpu, "wall_s": wall,
            "bpb": h.metrics()["bits_per_byte"], "val_loss": h.loss, "bytes_per_token": h.bytes / h.tokens, "evals": watch.evals}


def _seconds_per_step(base: dict, manifest: Path, optimizer: str, lr: float) -> float:
    tcfg = train_config_for_manifest(_train_section(base, optimizer, lr, 10, 10_000), manifest)
    watch = Budget(1e9)
    with tempfile.TemporaryDirectory() as out:
        build_trainer(tcfg, manifest, Path(out), callbacks=[watch]).fit()
    return watch.used() / 10


def _time_to(evals: list[tuple[float, int, float]], target_bpb: float) -> float | None:
    for cpu, _step, bpb in evals:
        if bpb <= target_bpb:
            return cpu
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--artifacts", default=os.path.join(tempfile.gettempdir(), "helox-bench-time-to-loss"))
    ap.add_argument("--budget", type=float, default=60.0, help="CPU seconds per run")
    # Both sweeps bracket the best LR measured (2026-12-03): AdamW 2.32 / 2.29 / 2.28 / 2.60 bpb at
    # 2e-3 / 4e-3 / 8e-3 / 1.6e-2; Muon 2.06 / 2.08 / 2.12 at 0.01 / 0.02 / 0.04, so 0.005 below it.
    ap.add_argument("--adamw-lrs", default="2e-3,4e-3,8e-3,1.6e-2")
    ap.add_argument("--muon-lrs", default="0.005,0.01,0.02", help="Muon's lr (AdamW keeps the config's for the rest)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between bpb scores (time-to-target)")
    ap.add_argument("--val-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_run_config(args.config)
    t0 = time.perf_counter()
    prep = prepare_dataset(data_prep_config(cfg.corpus, cfg.data), ArtifactStore(args.artifacts))
    manifest = prep.manifest_path
    base = cfg.train
    print(f"data: {manifest.parent.name} ({prep.status}, {time.perf_counter() - t0:.0f}s); model {base.get('model')} "
          f"{base.get('model_overrides', {})}; batch {base.get('batch')}; budget {args.budget:.0f} CPU-s per run, "
          f"{args.threads} thread(s); load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    spans: dict[str, float] = {}
    for opt, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        first = float(lrs.split(",")[0])
        spans[opt] = _seconds_per_step(base, manifest, opt, first)
        print(f"calibration: {opt} {spans[opt] * 1000:.0f} CPU-ms/step -> {int(args.budget / spans[opt])} steps",
              flush=True)

    runs: list[dict[str, Any]] = []
    print(f"\n{'optimizer':<8} {'lr':>8} {'steps':>6} {'CPU s':>6} {'wall s':>7} {'val bpb':>8}")
    for opt, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        steps = max(int(args.budget / spans[opt]), 10)
        for lr in (float(x) for x in lrs.split(",")):
            r = _run(base, manifest, opt, lr, args.budget, steps, args.eval_every, args.val_tokens)
            runs.append(r)
            print(f"{opt:<8} {lr:>8.2g} {r['steps']:>6} {r['cpu_s']:>6.1f} {r['wall_s']:>7.1f} {r['bpb']:>8.4f}",
                  flush=True)

    best = {opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["bpb"]) for opt in ("adamw", "muon")}
    a, m = best["adamw"], best["muon"]
    print(f"\nbest AdamW lr {a['lr']:g}: {a['bpb']:.4f} bpb after {a['cpu_s']:.1f} CPU-s ({a['steps']} steps)")
    print(f"best Muon  lr {m['lr']:g}: {m['bpb']:.4f} bpb after {m['cpu_s']:.1f} CPU-s ({m['steps']} steps)")
    ratio = m["bpb"] / a["bpb"]
    print(f"Muon / AdamW bpb at equal CPU time: {ratio:.3f} ({(1 - ratio) * 100:+.1f}% lower; target >= 10%)")
    reached = _time_to(m["evals"], a["bpb"])
    if reached is None:
        print(f"Muon did not reach AdamW's final bpb within the budget (scored every {args.eval_every} steps)")
    else:
        print(f"Muon reached AdamW's final bpb at {reached:.1f} CPU-s: {reached / a['cpu_s']:.2f}x AdamW's time "
              "(target <= 0.7x)")
    verdict = ratio <= 0.9 or (reached is not None and reached / a["cpu_s"] <= 0.7)
    print(f"target met: {'yes' if verdict else 'no'}; load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
