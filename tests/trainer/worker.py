"""Subprocess entry point for the trainer tests (plain python or torchrun).

    python -m tests.trainer.worker --out DIR --overrides JSON [--resume latest|PATH] [--hang-after STEP]
        [--stop-after STEP]

Writes one JSON line per step ({"step", "loss"}) to OUT/losses-rank{R}.jsonl and, on rank 0,
a final RESULT line on stdout. With --hang-after it waits for pending checkpoint writes
after that step, prints READY and sleeps, to be killed by the test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from services.trainer.data import InMemoryBatchSource
from services.trainer.hooks import Callback
from services.trainer.loop import run_training

from .helpers import make_config, make_domains


class StepLog(Callback):
    def __init__(self, path: Path, hang_after: int | None, stop_after: int | None) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - closed by the process ending
        self.hang_after, self.stop_after = hang_after, stop_after

    def on_step_end(self, trainer, result) -> None:
        self.f.write(json.dumps({"step": result.step, "loss": result.loss}) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        if result.step == self.stop_after and trainer.ctx.is_main:
            trainer.request_stop("test")  # rank 0 decides; the other ranks follow through the broadcast
        if result.step == self.hang_after:
            trainer.checkpointer.wait()
            print("READY", flush=True)
            time.sleep(600)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--resume", default=None)
    ap.add_argument("--hang-after", type=int, default=None)
    ap.add_argument("--stop-after", type=int, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)  # as the tests' in-process runs (tests/trainer/conftest.py)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = make_config(**json.loads(args.overrides))
    micro = cfg.batch.micro_batch_size
    data = InMemoryBatchSource(make_domains(), seq_len=cfg.batch.seq_len, batch_size=micro, rank=rank, world_size=world)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run_training(cfg, data, args.out, resume=args.resume,
                       callbacks=[StepLog(args.out / f"losses-rank{rank}.jsonl", args.hang_after, args.stop_after)])
    if rank == 0:
        print("RESULT " + json.dumps({"status": res.status, "final_step": res.final_step,
                                      "losses": {str(k): v for k, v in res.losses.items()}}), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's threads can abort a finished process in C++ static
    # destructors ("terminate called without an active exception"), failing a run that succeeded.
    os._exit(0)


if __name__ == "__main__":
    main()
