"""evaluate_checkpoint end to end: results file before return, the event payload, error verdicts,
gates, the reference cache, the CLI hook and finding the dataset from a checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from contracts import EvaluationCompleted
from services.evaluator import evaluate as ev
from services.evaluator.config import EvalConfig
from services.evaluator.evaluate import (
    dataset_manifest_for,
    evaluate_checkpoint,
    evaluation_completed,
    previous_best_checkpoint,
    run_cli_eval,
    safe_evaluate,
)

from .helpers import perturbed, save


def fast_config(**kw) -> EvalConfig:
    base = dict(seq_len=128, max_val_tokens=3000, bootstrap_samples=500)
    return EvalConfig(**{**base, **kw})


def test_report_and_results_file_hold_everything(checkpoint, dataset, tmp_path):
    report = evaluate_checkpoint(checkpoint, dataset, fast_config(), out_dir=tmp_path / "out")
    assert report.verdict == "pass" and report.error is None and report.step == 30
    assert set(report.metrics) >= {"val_loss", "val_ppl", "bits_per_byte", "val_tokens_per_s", "suite_mean"}
    assert set(report.domain_metrics) == {"code", "prose"}
    assert set(report.suite_scores) == {"python_completion", "python_docstrings", "python_multiple_choice"}
    assert all(p["passed"] for p in report.parity.values())
    assert [g.name for g in report.gates] == ["parity"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["report"]["digest"] == report.digest
    suites = {s["name"]: s for s in results["measurement"]["suites"]}
    items = suites["python_completion"]["items"]
    assert len(items) == 11 and all("output" in i and "score" in i for i in items)
    mc = suites["python_multiple_choice"]["items"][0]
    assert len(mc["choice_logprobs"]) == 2
    docs = results["measurement"]["heldout"]["domains"]["code"]
    assert len(docs["doc_nll"]) == len(docs["doc_tokens"]) == int(report.domain_metrics["code"]["documents"])


def test_evaluation_completed_payload_round_trips(checkpoint, dataset, tmp_path):
    report = evaluate_checkpoint(checkpoint, dataset, fast_config(), out_dir=tmp_path)
    event = evaluation_completed(report, evaluator="evaluator-1")
    again = EvaluationCompleted.model_validate_json(event.model_dump_json())
    assert again.verdict == "pass" and again.gates_passed and again.checkpoint_digest == report.digest
    assert again.metrics["val_ppl"] == pytest.approx(report.metrics["val_ppl"])
    assert again.parity["int8_dynamic"]["top1_agreement"] == report.parity["int8_dynamic"]["top1_agreement"]
    assert again.results is not None and again.results.uri.endswith("results.json")
    assert again.checkpoint.sha256 == report.digest


def test_a_corrupt_checkpoint_gives_an_error_verdict_not_an_exception(checkpoint, dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = safe_evaluate(broken, dataset, fast_config(), out_dir=tmp_path / "out")
    assert report.verdict == "error"
    assert "CheckpointCorruptError" in report.error and "model.safetensors" in report.error
    event = evaluation_completed(report)
    assert event.verdict == "error" and not event.gates_passed and event.error == report.error
    assert event.step == 30 and event.checkpoint_digest == report.digest
    assert json.loads((tmp_path / "out" / "results.json").read_text())["report"]["verdict"] == "error"


def test_a_missing_checkpoint_or_dataset_also_gives_an_error_verdict(checkpoint, dataset, tmp_path):
    r1 = safe_evaluate(tmp_path / "nowhere", dataset, fast_config(), out_dir=tmp_path / "a")
    assert r1.verdict == "error" and "no checkpoint directory" in r1.error
    with pytest.raises(ev.EvaluationError, match="nowhere"):  # no manifest, no digest: no made-up reference
        evaluation_completed(r1)
    r2 = safe_evaluate(checkpoint, tmp_path / "no-dataset.json", fast_config(), out_dir=tmp_path / "b")
    assert r2.verdict == "error" and r2.digest is not None


def test_an_unusable_reference_is_an_error_gate(checkpoint, dataset, tmp_path):
    report = evaluate_checkpoint(checkpoint, dataset, fast_config(), previous_best=tmp_path / "gone",
                                 out_dir=tmp_path / "out")
    assert report.verdict == "error" and "reference[previous_best]" in report.error
    gate = next(g for g in report.gates if g.name == "reference[previous_best]")
    assert not gate.passed and json.loads(gate.detail)["verdict"] == "error"


def test_absolute_gates_and_the_baseline_reference(trained, checkpoint, dataset, tmp_path):
    worse = save(perturbed(trained, 0.3), tmp_path / "ckpts", 90)
    cfg = fast_config(baseline_checkpoint=checkpoint, gates={"max_val_ppl": 1.5, "min_suite_scores": {"nope": 0.1}})
    report = evaluate_checkpoint(worse, dataset, cfg, out_dir=tmp_path / "out")
    names = {g.name: g for g in report.gates}
    assert not names["val_ppl_regression[baseline]"].passed
    assert not names["val_ppl_max"].passed
    assert json.loads(names["suite_min:nope"].detail)["verdict"] == "error"
    assert "suite_regression[baseline]:python_multiple_choice" in names
    assert report.verdict == "error"  # the suite floor names a suite that was not run


def test_references_are_scored_once_and_cached_on_disk(checkpoint, dataset, tmp_path, monkeypatch):
    cfg = fast_config(cache_dir=tmp_path / "cache", parity={"enabled": False}, suites_dir=None)
    evaluate_checkpoint(checkpoint, dataset, cfg, out_dir=tmp_path / "a")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    ev.clear_cache()  # a fresh process: only the disk cache is left
    calls = []
    real = ev._measure
    monkeypatch.setattr(ev, "_measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    copy = save(*_reload(checkpoint), tmp_path / "ckpts", 31)
    report = evaluate_checkpoint(copy, dataset, cfg, previous_best=checkpoint, out_dir=tmp_path / "b")
    assert len(calls) == 1  # the new checkpoint only; the reference came from the cache
    assert report.references["previous_best"]["digest"] == ev.checkpoint_digest(checkpoint)


def _reload(checkpoint):
    from shared.checkpoint import load_model

    return (load_model(checkpoint)[0],)


def test_run_cli_eval_returns_a_printable_summary(checkpoint, dataset, tmp_path):
    text = run_cli_eval(checkpoint, None, dataset, tmp_path / "out",
                        config=fast_config(parity={"enabled": False}))
    assert "PASS" in text and "bits/byte" in text and "python_completion" in text
    assert (tmp_path / "out" / "results.json").is_file()
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "one.jsonl").write_text('{"id": "a", "prompt": "x", "expected": "y"}\n')
    text = run_cli_eval(checkpoint, suites, dataset, tmp_path / "out2", config=fast_config(parity={"enabled": False}))
    assert "suite one" in text and "python_completion" not in text
    broken = run_cli_eval(tmp_path / "missing", None, dataset, tmp_path / "out3")
    assert "ERROR" in broken


def test_dataset_and_previous_best_are_found_from_the_checkpoint(trained, dataset, tmp_path):
    from shared.data.manifest import load_manifest

    version = load_manifest(dataset).version
    root = tmp_path / "ckpts"
    a = save(trained, root, 10, dataset_version=version, metric=3.0)
    b = save(trained, root, 20, dataset_version=version, metric=2.5)
    c = save(trained, root, 30, dataset_version=version, metric=2.8)
    assert previous_best_checkpoint(c) == b
    assert previous_best_checkpoint(b) == a
    assert previous_best_checkpoint(a) is None
    store = dataset.parents[2]  # <store>/datasets/<version>/manifest.json
    assert dataset_manifest_for(c, store) == dataset
    with pytest.raises(ev.EvaluationError, match="not in the store"):
        dataset_manifest_for(c, tmp_path)
