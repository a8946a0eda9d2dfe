"""A job built by the one factory (`job.build_trainer`) on a real TokenDataset, recorded per step.

    torchrun --standalone --nproc_per_node=N -m tests.trainer.dataset_worker --manifest M --out DIR [--overrides JSON]

Each rank writes OUT/rank{R}.json: every step's input rows (what the rank trained on), and
rank 0 also the logged metrics (data_cursor, tokens_seen, sample_ranges, loss, val_loss).
`record_run` is also called in-process by the tests, for the one-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from services.trainer.hooks import Callback
from services.trainer.job import build_trainer, train_config_for_manifest
from services.trainer.loop import Trainer, TrainingError
from shared.data.dataset import BatchLoader, TokenDataset

from .helpers import _merge

BASE: dict[str, Any] = {
    "model": "tiny", "max_steps": 4, "seed": 0,
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "batch": {"global_batch_size": 4, "micro_batch_size": 4, "seq_len": 32},
    "eval": {"every": 2, "batches": 2},
    "probes": {"enabled": False},
    "log": {"every": 1, "structlog": False, "wandb": {"mode": "disabled"}},
    "checkpoint": {"every": None},
}
LOGGED = ("step", "data_cursor", "tokens_seen", "sample_ranges", "loss", "val_loss")


class StepRecord(Callback):
    def __init__(self) -> None:
        self.rows: dict[int, list[list[int]]] = {}
        self.metrics: list[dict[str, Any]] = []

    def on_batch(self, trainer, batch, step) -> None:
        self.rows.setdefault(step, []).extend(batch["input_ids"].tolist())

    def on_log(self, trainer, metrics) -> None:
        self.metrics.append({k: metrics.get(k) for k in LOGGED})


def record_run(manifest: Path, out: Path, overrides: dict[str, Any], *, unsplit: bool = False) -> dict[str, Any]:
    """unsplit: every rank reads the whole stream (the dataset without rank/world_size), the bug
    the factory exists to prevent, built by hand to show the loop refuses it."""
    cfg = train_config_for_manifest(_merge(BASE, overrides), manifest)
    rec = StepRecord()
    if unsplit:
        data = BatchLoader(TokenDataset(manifest, "train", batch_size=cfg.batch.global_batch_size // 2,
                                        seq_len=cfg.batch.seq_len, seed=cfg.seed))
        trainer = Trainer(cfg, data, out, callbacks=[rec])
    else:
        trainer = build_trainer(cfg, manifest, out, run_id="dist-data", callbacks=[rec])
    try:
        result = trainer.fit()
    except TrainingError as exc:
        return {"error": str(exc), "rank": int(os.environ.get("RANK", "0"))}
    return {"status": result.status, "losses": {str(k): v for k, v in result.losses.items()},
            "rows": {str(k): v for k, v in rec.rows.items()}, "metrics": rec.metrics,
            "rank": int(os.environ.get("RANK", "0"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--unsplit", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the in-process reference (tests/trainer/conftest.py): bit-comparable
    args.out.mkdir(parents=True, exist_ok=True)
    rec = record_run(args.manifest, args.out, json.loads(args.overrides), unsplit=args.unsplit)
    (args.out / f"rank{rec['rank']}.json").write_text(json.dumps(rec))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown (see tests/trainer/worker.py)


if __name__ == "__main__":
    main()
