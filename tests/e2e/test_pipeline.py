"""The whole pipeline with real processes on a real (embedded) Redis:
`helox up` -> `helox run` (data-prep -> trainer -> health-monitor -> evaluator -> exporter)
-> model-ready -> the reference Cyrex subscriber loads the export and answers a prompt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis
import yaml

from contracts import (
    CheckpointSaved,
    EvaluationCompleted,
    HealthAlert,
    ModelReady,
    TrainerAction,
    TrainingCompleted,
    TrainingMetrics,
)
from contracts.topics import TOPICS
from shared.bus.wire import body_of
from tests.bus.helpers import read_all, wait_for
from tests.contracts import schema_check
from tests.data_prep.conftest import write_corpus

REPO = Path(__file__).resolve().parents[2]
HELOX = [sys.executable, "-m", "helox.cli"]


def pipeline_config(tmp: Path, name: str, *, steps: int = 60, stages: list[str] | None = None,
                    faults: dict | None = None, export: dict | None = None) -> Path:
    write_corpus(tmp, n_prose=120, n_code=80)
    cfg = {
        "name": name,
        "stages": stages or ["data", "train", "eval", "export"],
        "timeout_s": 600,
        "corpus": {"sources": [{"path": str(tmp / "corpus/prose"), "domain": "prose"},
                               {"path": str(tmp / "corpus/code"), "domain": "code"}],
                   "roots": [str(tmp / "corpus")]},
        "data": {"filters": {"min_doc_chars": 32}, "tokenizer": {"vocab_size": 512},
                 "sharding": {"val_fraction": 0.1, "workers": 1}},
        "train": {"model": "tiny", "max_steps": steps, "optim": {"lr": 2e-3, "warmup_steps": 10},
                  "batch": {"global_batch_size": 8, "micro_batch_size": 8, "seq_len": 64},
                  "checkpoint": {"every": 20, "keep_last": 5, "background": False}, "eval": {"every": 20, "batches": 2},
                  "log": {"every": 2, "wandb": {"mode": "disabled"}}, "faults": faults or {}},
        "eval": {"max_val_tokens": 4000, "seq_len": 64, "bootstrap_samples": 200},
        "export": export or {"formats": ["native", "hf", "onnx"]},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stack_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELOX_")}
    env.update(HELOX_STATE_DIR=str(tmp / "state"), HELOX_ARTIFACTS=str(tmp / "artifacts"),
               HELOX_HEARTBEAT_INTERVAL_S="1", HELOX_RECLAIM_IDLE_MS="3000", HELOX_SIGNING_KEY="test-signing-key",
               PYTHONPATH=str(REPO), COLUMNS="200", OMP_NUM_THREADS="1")
    return env


class Stack:
    """`helox up` in the background for one test."""

    def __init__(self, tmp: Path, evaluators: int = 1) -> None:
        self.env = stack_env(tmp)
        self.log = open(tmp / "up.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([*HELOX, "up", "--evaluators", str(evaluators)], env=self.env, cwd=tmp,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        state = tmp / "state" / "stack.json"
        wait_for(state.exists, timeout=60, what="the stack to start")
        self.url = json.loads(state.read_text())["redis_url"]
        self.client = redis.Redis.from_url(self.url)
        self.tmp = tmp

    def run(self, config: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HELOX, "run", str(config)], env=self.env, cwd=self.tmp, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(90)
        self.log.close()


def test_whole_pipeline_to_model_ready_and_cyrex_answers(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path, "e2e")
    stack = Stack(tmp_path)
    try:
        out = stack.run(config)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout and "sample" in out.stdout
        client = stack.client
        (ready,) = read_all(client, ModelReady)
        assert {"native", "hf", "onnx"} <= set(ready.payload.formats)
        (done,) = read_all(client, TrainingCompleted)
        assert ready.payload.lineage.checkpoint_digest == done.payload.final_checkpoint_digest
        assert ready.payload.lineage.run_id == ready.run_id == done.run_id
        evals = read_all(client, EvaluationCompleted)
        saved = read_all(client, CheckpointSaved)
        # Every checkpoint judged exactly once.
        assert sorted(e.payload.checkpoint_digest for e in evals) == sorted(c.payload.digest for c in saved)
        assert len(read_all(client, TrainingMetrics)) >= 25

        cyrex = subprocess.run(
            [sys.executable, "-m", "cyrex_example", "--redis-url", stack.url, "--from-start", "--max-messages", "1",
             "--prompt", "def ", "--max-new-tokens", "8"],
            env=stack.env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert cyrex.returncode == 0, cyrex.stderr[-3000:]
        assert ready.payload.model_id in cyrex.stdout + cyrex.stderr
        pending = client.xpending("helox.export.model-ready", "cyrex")["pending"]
        assert pending == 0
        _every_event_matches_the_asyncapi_schema(client)

        report = subprocess.run([*HELOX, "report", ready.run_id], env={**stack.env, "HELOX_REDIS_URL": stack.url},
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        html = Path(report.stdout.split("report:")[-1].strip()).read_text()
        assert html.count("<svg") >= 3
    finally:
        stack.stop()


PIPELINE_EVENTS = ("RunRequested", "DatasetReady", "TrainingStarted", "TrainingMetrics", "CheckpointSaved",
                   "TrainingCompleted", "EvaluationCompleted", "ModelReady", "ServiceHeartbeat")


def _every_event_matches_the_asyncapi_schema(client: redis.Redis, expected: tuple[str, ...] = PIPELINE_EVENTS) -> None:
    """Every entry of every stream, as written on the wire, validates against its envelope schema
    in contracts/asyncapi.json, checked with jsonschema (not with the project's models)."""
    document = json.loads((REPO / "contracts" / "asyncapi.json").read_text())
    assert document == schema_check.document(), "contracts/asyncapi.json is stale: python -m contracts.asyncapi --write"
    seen: dict[str, int] = {}
    problems = []
    for key, t in TOPICS.items():
        for entry_id, fields in client.xrange(t.stream()):
            body = json.loads(body_of(fields))
            seen[body.get("type", "?")] = seen.get(body.get("type", "?"), 0) + 1
            problems += [f"{key} {entry_id.decode()}: {e}" for e in schema_check.envelope_errors(body)]
            if body.get("type") != t.payload.EVENT_TYPE:
                problems.append(f"{key} {entry_id.decode()}: a {body.get('type')} on the {t.payload.EVENT_TYPE} stream")
    assert not problems, "\n".join(problems[:20])
    for event in expected:
        assert seen.get(event), f"no {event} was checked; checked: {seen}"


def test_injected_lr_blowup_is_detected_rolled_back_and_the_run_recovers(tmp_path: Path) -> None:
    """The closed loop: trainer -> metrics -> health-monitor -> alert -> trainer rolls back."""
    steps = 80
    clean = pipeline_config(tmp_path, "clean", steps=steps, stages=["data", "train"])
    faulty = pipeline_config(tmp_path, "faulty", steps=steps, stages=["data", "train"],
                             faults={"lr_multiply_step": 45, "lr_multiply_factor": 300.0})
    stack = Stack(tmp_path)
    try:
        first = stack.run(clean)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        second = stack.run(faulty)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        client = stack.client
        done = {e.run_id.split("-")[0]: e for e in read_all(client, TrainingCompleted)}
        faulty_run = done["faulty"].run_id
        alerts = [a for a in read_all(client, HealthAlert) if a.run_id == faulty_run and a.payload.state == "firing"]
        assert alerts, "the LR blow-up was not detected"
        actions = [a for a in read_all(client, TrainerAction) if a.run_id == faulty_run]
        rollbacks = [a for a in actions if a.payload.action == "rollback"]
        assert rollbacks, f"no rollback; actions: {[a.payload.action for a in actions]}"
        alert_ids = {a.event_id for a in alerts}
        assert any(a.payload.alert_event_id in alert_ids for a in rollbacks)  # the action cites the alert
        assert done["faulty"].payload.rollbacks >= 1
        # Validation loss on the same held-out batches: a single training batch's loss is too noisy.
        clean_loss, faulty_loss = done["clean"].payload.best_val_loss, done["faulty"].payload.best_val_loss
        assert clean_loss is not None and faulty_loss is not None
        assert abs(faulty_loss - clean_loss) <= 0.10 * clean_loss, (clean_loss, faulty_loss)
        assert not [a for a in read_all(client, HealthAlert) if a.run_id == done["clean"].run_id
                    and a.payload.severity == "critical"]
        _every_event_matches_the_asyncapi_schema(
            client, ("RunRequested", "DatasetReady", "TrainingStarted", "TrainingMetrics", "CheckpointSaved",
                     "TrainerAction", "HealthAlert", "TrainingCompleted", "ServiceHeartbeat"))
    finally:
        stack.stop()
