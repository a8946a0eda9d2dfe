"""Resume is bit-exact on CPU: N straight steps == k steps + stop/kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.trainer.loop import Trainer, TrainingError
from shared.checkpoint import CheckpointNotFoundError, list_checkpoints

from .helpers import Recorder, make_config

REPO = Path(__file__).resolve().parents[2]

# Everything stateful at once: seq-len warmup, adaptive clipping, online mixing, probes, eval.
STATEFUL = {
    "max_steps": 10,
    "stability": {"adaptive_clip": True, "adaptive_min_history": 2, "adaptive_sigma": 1.0},
    "mixing": {"enabled": True, "update_every": 2},
    "probes": {"enabled": True, "every": 3},
    "curriculum": {"seq_len_start": 16, "seq_len_warmup_steps": 4, "seq_len_multiple": 8},
}


def test_stop_and_resume_gives_identical_losses_at_every_step(source, tmp_path):
    cfg = make_config(**STATEFUL)
    straight = Trainer(cfg, source(), tmp_path / "a").fit().losses
    first = Trainer(cfg, source(), tmp_path / "b", callbacks=[Recorder(at={5: lambda t: t.request_stop()})]).fit()
    assert first.status == "stopped" and first.final_step == 5
    second = Trainer(cfg, source(), tmp_path / "b").fit(resume="latest")
    assert second.status == "completed"
    assert {**first.losses, **second.losses} == straight  # exact equality, not a tolerance


def test_resume_falls_back_past_a_corrupt_latest_checkpoint(source, tmp_path):
    cfg = make_config(max_steps=8, checkpoint={"every": 3})
    straight = Trainer(cfg, source(), tmp_path / "a").fit().losses
    Trainer(make_config(max_steps=8, checkpoint={"every": 3}), source(), tmp_path / "b",
            callbacks=[Recorder(at={7: lambda t: t.request_stop()})]).fit()
    ckpts = list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [c.step for c in ckpts] == [3, 6, 7]
    (ckpts[-1].path / "state.safetensors").write_bytes(b"garbage")
    resumed = Trainer(cfg, source(), tmp_path / "b").fit(resume="latest")
    assert min(resumed.losses) == 7  # resumed from step 6
    assert all(resumed.losses[s] == straight[s] for s in resumed.losses)


def test_resume_refuses_a_different_model_and_a_missing_checkpoint(source, tmp_path):
    Trainer(make_config(max_steps=2), source(), tmp_path).fit()
    other = make_config(max_steps=4, model_overrides={"n_layer": 2})
    with pytest.raises(TrainingError, match="different model"):
        Trainer(other, source(), tmp_path).fit(resume="latest")
    with pytest.raises(CheckpointNotFoundError):
        Trainer(make_config(), source(), tmp_path / "empty").fit(resume="latest")


def _worker(out: Path, overrides: dict, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.trainer.worker", "--out", str(out), "--overrides", json.dumps(overrides), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(source, tmp_path):
    overrides = {**STATEFUL, "checkpoint": {"every": 3}}
    straight = Trainer(make_config(**overrides), source(), tmp_path / "ref").fit().losses

    run = tmp_path / "run"
    proc = _worker(run, overrides, "--hang-after", "7")
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and "READY" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"worker exited early: {proc.stderr.read()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed = [json.loads(x) for x in (run / "losses-rank0.jsonl").read_text().splitlines()]
    assert [x["step"] for x in killed] == list(range(1, 8))
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [3, 6]

    resumed = _worker(run, overrides, "--resume", "latest")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    losses = {int(k): v for k, v in result["losses"].items()}
    assert sorted(losses) == [7, 8, 9, 10] and result["status"] == "completed"
    for x in killed:
        assert x["loss"] == straight[x["step"]], x
    for step, loss in losses.items():
        assert loss == straight[step], step
