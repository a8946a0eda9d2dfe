"""`helox run` ends promptly, non-zero, with one line naming the gate and the checkpoint, when
the evaluator rejects the checkpoint the exporter would publish (no ModelReady can come).

The real-process test: `helox run` starts its own stack (embedded Redis, every service as a
process) on a tiny corpus with a run config whose absolute perplexity ceiling no model meets
(`eval.gates.max_val_ppl: 1.0`: perplexity is > 1 unless every token is certain), so the final
checkpoint's evaluation fails the `val_ppl_max` gate. The unit tests drive `ExportWatch` with
real EvaluationCompleted payloads (final / best policies, the parity gate's evidence).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import redis
import yaml

from contracts import ArtifactRef, CheckpointSaved, EvaluationCompleted, GateResult, ModelReady
from helox.commands.run import ExportWatch
from helox.runconfig import load_run_config
from shared.redis_server import RedisServer
from tests.bus.helpers import read_all
from tests.e2e.test_pipeline import HELOX, pipeline_config, stack_env

REF = ArtifactRef(uri="file:///a/ckpt/step_000010/model.safetensors", sha256="0" * 64, size_bytes=1)


def test_a_final_checkpoint_failing_a_gate_ends_helox_run_at_once(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path, "gated", steps=10, export={"formats": ["native"]})
    cfg = yaml.safe_load(config.read_text())
    cfg["timeout_s"] = 900  # a hang would show as a run that took this long
    cfg["train"]["checkpoint"]["every"] = None  # one checkpoint: the final one
    cfg["eval"]["gates"] = {"max_val_ppl": 1.0}
    cfg["eval"]["suites_dir"] = None
    config.write_text(yaml.safe_dump(cfg))
    env = stack_env(tmp_path)
    t0 = time.monotonic()
    run = subprocess.run([*HELOX, "run", str(config)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=800)
    took = time.monotonic() - t0
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    (line,) = errors
    assert "val_ppl_max" in line and "threshold 1.0" in line and "final checkpoint (step 10" in line
    assert "no model will be exported" in line
    assert "Traceback" not in run.stderr and "timed out" not in run.stderr
    assert took < 600
    # The stack `helox run` started is stopped; its Redis data stays in the state directory.
    server = RedisServer(tmp_path / "state" / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        (ev,) = read_all(client, EvaluationCompleted)
        assert ev.payload.is_final and ev.payload.verdict == "regression"
        assert ev.payload.checkpoint.uri in line
        assert not read_all(client, ModelReady)
    finally:
        server.stop()


def _config(tmp: Path, **export: object) -> Path:
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "w", "stages": ["data", "train", "eval", "export"],
                                    "export": export}))
    return path


def _eval(digest: str, *, final: bool, gates: list[GateResult], parity: dict | None = None,
          verdict: str | None = None) -> EvaluationCompleted:
    ok = all(g.passed for g in gates)
    return EvaluationCompleted(checkpoint=REF.model_copy(update={"uri": f"file:///ckpt/{digest}/model.safetensors"}),
                               checkpoint_digest=digest, step=10 if final else 5, is_final=final, gates=gates,
                               gates_passed=ok, verdict=verdict or ("pass" if ok else "regression"),
                               parity=parity or {})


def _saved(digest: str) -> CheckpointSaved:
    return CheckpointSaved(step=1, tokens_seen=1, checkpoint=REF, digest=digest, dataset_version="d", reason="interval",
                           is_final=False)


INT8 = {"passed": False, "top1_agreement": 0.85, "min_agreement": 0.9, "ppl_rel_change": 0.08,
        "max_ppl_increase": 0.05, "ppl_fp32": 20.0, "ppl_int8": 21.6}
PARITY_FAIL = GateResult(name="parity", passed=False, detail=json.dumps(
    {"verdict": "regression", "failed": ["int8_dynamic"], "checks": ["batch_padding", "int8_dynamic", "kv_cache"]}))
OK = GateResult(name="parity", passed=True, detail="{}")


def test_final_policy_names_the_parity_check_and_its_numbers(tmp_path: Path) -> None:
    watch = ExportWatch.of(load_run_config(_config(tmp_path)))
    assert watch is not None
    assert watch.observe(_eval("a", final=False, gates=[PARITY_FAIL], parity={"int8_dynamic": INT8})) is None
    why = watch.observe(_eval("b", final=True, gates=[PARITY_FAIL], parity={"int8_dynamic": INT8}))
    assert why is not None and "\n" not in why
    assert "parity (int8_dynamic: top1_agreement 0.85, min_agreement 0.9, ppl_rel_change 0.08" in why
    assert "file:///ckpt/b/model.safetensors" in why and "step 10" in why


def test_final_policy_waits_for_a_passing_final_checkpoint(tmp_path: Path) -> None:
    watch = ExportWatch.of(load_run_config(_config(tmp_path)))
    assert watch is not None and watch.observe(_eval("b", final=True, gates=[OK])) is None


def test_an_evaluation_error_is_named(tmp_path: Path) -> None:
    watch = ExportWatch.of(load_run_config(_config(tmp_path)))
    bad = _eval("b", final=True, gates=[], verdict="error").model_copy(update={"error": "OSError: gone\nreally",
                                                                              "gates_passed": False})
    why = watch.observe(bad)
    assert why is not None and "could not be evaluated: OSError: gone really" in why


def test_best_policy_fails_only_when_every_checkpoint_failed(tmp_path: Path) -> None:
    watch = ExportWatch.of(load_run_config(_config(tmp_path, checkpoint="best")))
    assert watch is not None
    for d in "abc":
        watch.observe(_saved(d))
    assert watch.observe(_eval("c", final=True, gates=[PARITY_FAIL])) is None  # a and b still to be judged
    assert watch.observe(_eval("a", final=False, gates=[PARITY_FAIL])) is None
    why = watch.observe(_eval("b", final=False, gates=[PARITY_FAIL]))
    assert why is not None and "no checkpoint of the run passed" in why and "file:///ckpt/c/" in why

    passing = ExportWatch.of(load_run_config(_config(tmp_path, checkpoint="best")))
    for d in "ab":
        passing.observe(_saved(d))
    assert passing.observe(_eval("a", final=False, gates=[OK])) is None
    assert passing.observe(_eval("b", final=True, gates=[PARITY_FAIL])) is None  # a's export is coming


def test_no_watch_when_the_export_does_not_wait_for_evaluation(tmp_path: Path) -> None:
    assert ExportWatch.of(load_run_config(_config(tmp_path, on="training_completed"))) is None
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"name": "w", "stages": ["data", "train", "eval"]}))
    assert ExportWatch.of(load_run_config(path)) is None
