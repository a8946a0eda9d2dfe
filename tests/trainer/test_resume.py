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
import structlog

from services.trainer.control import ActionKind, Alert
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


def _adam_steps(trainer: Trainer) -> set[int]:
    return {int(s["step"]) for s in trainer.optimizer.state.values()}


def test_a_step_0_checkpoint_changes_nothing_in_the_run(source, tmp_path):
    # Issue 13: saving before the first step used to create AdamW's state with a zero-gradient step(),
    # so the step counter ran one ahead (13 after 12 steps) and the loss moved from step 2 on.
    plain = Trainer(make_config(max_steps=12), source(), tmp_path / "a")
    at_start = Trainer(make_config(max_steps=12, checkpoint={"at_start": True}), source(), tmp_path / "b")
    ra, rb = plain.fit(), at_start.fit()
    assert [c.step for c in list_checkpoints(tmp_path / "b" / "checkpoints")] == [0, 12]
    assert rb.losses == ra.losses
    assert _adam_steps(plain) == _adam_steps(at_start) == {12}
    # Resuming from that step-0 checkpoint is the same run again.
    again = Trainer(make_config(max_steps=12), source(), tmp_path / "c")
    rc = again.fit(resume=tmp_path / "b" / "checkpoints" / "step-000000000")
    assert rc.losses == ra.losses and _adam_steps(again) == {12}


def test_a_rollback_to_the_step_0_checkpoint_restarts_the_optimizer(source, tmp_path):
    rec = Recorder(at={3: lambda t: t.submit(Alert("divergence", "critical", 1, 3)) if t.policy.rollbacks == 0
                       else None})
    trainer = Trainer(make_config(max_steps=6, checkpoint={"at_start": True}), source(), tmp_path, callbacks=[rec])
    res = trainer.fit()
    assert rec.actions[0].kind is ActionKind.ROLLBACK and rec.actions[0].params["restored_step"] == 0
    assert res.rollbacks == 1 and res.final_step == 6
    assert _adam_steps(trainer) == {6}  # 3 steps undone with their moments, not 3 + 6


def test_resume_announces_the_corrupt_checkpoint_it_passes_over(source, tmp_path):
    cfg = make_config(max_steps=8, checkpoint={"every": 3})
    Trainer(cfg, source(), tmp_path, callbacks=[Recorder(at={7: lambda t: t.request_stop()})]).fit()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    corrupt = ckpts[-1].path
    assert corrupt.name == "step-000000007"
    (corrupt / "state.safetensors").write_bytes(b"garbage")
    rec = Recorder()
    with structlog.testing.capture_logs() as logs:
        res = Trainer(cfg, source(), tmp_path, callbacks=[rec]).fit(resume="latest")
    (warning,) = [x for x in logs if x["event"] == "checkpoint.corrupt_skipped"]
    assert warning["log_level"] == "warning" and warning["path"] == str(corrupt)
    assert warning["file"] == "state.safetensors"
    assert res.skipped_checkpoints == [corrupt] and min(res.losses) == 7  # resumed from step 6
    (record,) = rec.actions
    assert record.kind is ActionKind.RECORD and str(corrupt) in record.reason
    assert record.params["corrupt_checkpoint"] == str(corrupt)
    assert record.params["resumed_from"] == str(ckpts[-2].path)


def test_resume_after_an_lr_fault_keeps_the_faulted_lr(source, tmp_path):
    # The fault factor is the run's state like any other: a resume must not quietly undo it.
    cfg = make_config(max_steps=8, optim={"warmup_steps": 0, "schedule": "constant"},
                      faults={"lr_multiply_step": 3, "lr_multiply_factor": 2.0})
    straight = Trainer(cfg, source(), tmp_path / "a").fit().losses
    Trainer(cfg, source(), tmp_path / "b", callbacks=[Recorder(at={5: lambda t: t.request_stop()})]).fit()
    rec = Recorder()
    resumed = Trainer(cfg, source(), tmp_path / "b", callbacks=[rec]).fit(resume="latest")
    assert [r.lr for r in rec.results] == pytest.approx([2 * 3e-3] * 3)  # steps 6-8
    assert all(resumed.losses[s] == straight[s] for s in resumed.losses)
