"""Evaluate one checkpoint: held-out metrics, suites, parity, paired regression gates, verdict.

`evaluate_checkpoint` writes the full per-item results (JSON) to out_dir before it returns the
report; `safe_evaluate` never raises (a corrupt checkpoint or any failure becomes a report with
verdict 'error' and the reason); `evaluation_completed` turns a report into the event payload.

The model is rebuilt from the checkpoint alone (`shared.checkpoint.load_model`: the trainer
stores the resolved ModelConfig in state.json); the dataset version is in the manifest's meta
(`dataset_version`), and a dataset lives at `<artifacts>/datasets/<version>/manifest.json`
(`dataset_manifest_for`). References (the run's best earlier checkpoint, a fixed baseline) are
scored on exactly the same documents and items, so every comparison is paired; their
measurements are kept by checkpoint digest (memory, plus `config.cache_dir` when set), so the
best checkpoint is not rescored for every new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from contracts import ArtifactRef, EvaluationCompleted, GateResult
from shared.artifacts import atomic_write_bytes, sha256_file
from shared.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_digest,
    list_checkpoints,
    load_model,
)
from shared.data.manifest import MANIFEST_NAME, load_manifest
from shared.logging import get_logger

from .config import EvalConfig
from .heldout import HeldoutResult, dataset_tokenizer, heldout_metrics, manifest_file, sample_sequences
from .parity import run_parity
from .regression import PairedTest, absolute_gates, gate_verdict, regression_gates
from .suites import Suite, SuiteResult, load_suites, run_suites

log = get_logger("helox.evaluator")

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "helox-eval-results/1"
Verdict = Literal["pass", "regression", "error"]


class EvaluationError(RuntimeError):
    """The checkpoint cannot be evaluated against this dataset (say why and what to do)."""


class EvalReport(BaseModel):
    """What one evaluation found; the per-item detail is in the results file."""

    checkpoint: str
    digest: str | None = None
    step: int = 0
    dataset_version: str | None = None
    dataset_manifest: str | None = None
    is_final: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    domain_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    suite_scores: dict[str, float] = Field(default_factory=dict)
    suite_retrieval: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per suite with retrieval-conditioned items: n, score_with, score_without, gain.")
    suite_notes: dict[str, str] = Field(default_factory=dict, description="Per suite: items skipped and why.")
    parity: dict[str, dict[str, float | int | str | bool | None]] = Field(default_factory=dict)
    retrieval: dict[str, float] | None = Field(default=None, description="Retrieval gain (RAG-packed datasets).")
    retrieval_note: str | None = Field(default=None, description="How it was measured, or why it was skipped.")
    gates: list[GateResult] = Field(default_factory=list)
    verdict: Verdict = "pass"
    error: str | None = None
    references: dict[str, dict[str, Any]] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    results_path: str | None = None

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)


# --- loading ---------------------------------------------------------------------------------


def read_checkpoint_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's manifest.json (step, metric, meta); not verified."""
    path = Path(checkpoint_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def dataset_manifest_for(checkpoint_dir: str | Path, artifacts_root: str | Path) -> Path:
    """The dataset a trainer checkpoint was trained on: `<artifacts>/datasets/<meta.dataset_version>/manifest.json`."""
    meta = read_checkpoint_manifest(checkpoint_dir).get("meta", {})
    version = meta.get("dataset_version")
    if not version:
        raise EvaluationError(f"{checkpoint_dir} names no dataset_version in its manifest meta; pass the dataset manifest")
    path = Path(artifacts_root) / "datasets" / version / MANIFEST_NAME
    if not path.is_file():
        raise EvaluationError(f"dataset {version} of {checkpoint_dir} is not in the store ({path} missing)")
    return path


def previous_best_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The best (lowest validation-loss metric, then latest) earlier checkpoint beside this one, or None.

    A default for callers that keep no record of their own verdicts."""
    path = Path(checkpoint_dir)
    step = int(read_checkpoint_manifest(path).get("step", 0))
    earlier = [i for i in list_checkpoints(path.parent) if i.step < step and i.path != path]
    scored = [i for i in earlier if i.metric is not None and math.isfinite(i.metric)]
    if not scored:
        return None
    return min(scored, key=lambda i: (i.metric, -i.step)).path


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    """A model's scores on the evaluation set: what a later comparison pairs against."""

    digest: str
    step: int
    heldout: HeldoutResult
    suites: list[SuiteResult]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "step": self.step, "heldout": self.heldout.to_json(),
                "suites": [s.model_dump(mode="json") for s in self.suites]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Measurement:
        return cls(d["digest"], int(d["step"]), HeldoutResult.from_json(d["heldout"]),
                   [SuiteResult.model_validate(s) for s in d["suites"]])


_MEMO: OrderedDict[str, Measurement] = OrderedDict()
_MEMO_SIZE = 4


def _measurement_key(digest: str, dataset_version: str, config: EvalConfig, suites: list[Suite], seq_len: int) -> str:
    settings = {
        "digest": digest, "dataset": dataset_version, "seq_len": seq_len, "max_val_tokens": config.max_val_tokens,
        "domains": config.domains, "generation": config.generation.model_dump(mode="json"),
        "similarity": config.similarity, "embedding_model": config.embedding_model,
        "suites": [s.model_dump(mode="json", exclude={"source"}) for s in suites],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _cache_get(key: str, config: EvalConfig) -> Measurement | None:
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    if config.cache_dir is not None and (p := Path(config.cache_dir) / f"{key}.json").is_file():
        try:
            m = Measurement.from_json(json.loads(p.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("evaluator.cache_unreadable", path=str(p), error=str(exc))
            return None
        _cache_put(key, m, None)
        return m
    return None


def _cache_put(key: str, m: Measurement, config: EvalConfig | None) -> None:
    _MEMO[key] = m
    _MEMO.move_to_end(key)
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    if config is not None and config.cache_dir is not None:
        atomic_write_bytes(Path(config.cache_dir) / f"{key}.json", json.dumps(m.to_json()).encode())


def clear_cache() -> None:
    """Forget the in-memory reference measurements (tests, benchmarks)."""
    _MEMO.clear()


@dataclass
class _Context:
    manifest_path: Path
    dataset_version: str
    sp: Any
    eos_id: int
    pad_id: int
    vocab_size: int
    suites: list[Suite]
    rag: Any = None  # retrieval_gain.RagPrompter when a suite has retrieval items and the dataset is RAG-packed
    rag_note: str = ""


def _context(dataset_manifest: str | Path, config: EvalConfig, suite_dir: str | Path | None = None) -> _Context:
    mpath = manifest_file(dataset_manifest)
    manifest = load_manifest(mpath)
    sdir = suite_dir if suite_dir is not None else config.suites_dir
    suites = load_suites(sdir) if sdir is not None else []
    sp = dataset_tokenizer(mpath)
    rag, rag_note = None, ""
    if any(s.needs_retrieval for s in suites):
        from .retrieval_gain import RagPrompter  # bm25s: only when a suite asks for retrieval

        rag, rag_note = RagPrompter.of(mpath, sp)  # the index verified by its digest (raises otherwise)
    return _Context(mpath, manifest.version, sp, manifest.tokenizer.eos_id,
                    max(manifest.tokenizer.pad_id, 0), manifest.tokenizer.vocab_size, suites, rag, rag_note)


def _load(checkpoint_dir: Path, ctx: _Context) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    digest = checkpoint_digest(checkpoint_dir)
    model, cfg = load_model(checkpoint_dir, expected_digest=digest)  # CheckpointCorruptError on any mismatch
    manifest = read_checkpoint_manifest(checkpoint_dir)
    if cfg.vocab_size < ctx.vocab_size:
        raise EvaluationError(
            f"{checkpoint_dir} has a vocabulary of {cfg.vocab_size} ids, fewer than the tokenizer of dataset "
            f"{ctx.dataset_version} ({ctx.vocab_size}): evaluate it on the dataset it was trained on"
        )
    model.eval()
    return model, digest, manifest


def _measure(model: torch.nn.Module, digest: str, step: int, ctx: _Context, config: EvalConfig, seq_len: int
             ) -> Measurement:
    heldout = heldout_metrics(model, ctx.manifest_path, batch_size=config.batch_size, seq_len=seq_len,
                              max_tokens=config.max_val_tokens, domains=config.domains, tokenizer=ctx.sp)
    t0 = time.perf_counter()
    suites = run_suites(model, ctx.sp, ctx.suites, config, eos_id=ctx.eos_id, pad_id=ctx.pad_id, rag=ctx.rag,
                        rag_note=ctx.rag_note)
    heldout.settings["suites_seconds"] = time.perf_counter() - t0
    return Measurement(digest, step, heldout, suites)


def _reference(path: Path, ctx: _Context, config: EvalConfig, seq_len: int) -> Measurement:
    digest = checkpoint_digest(path)  # the files are verified when (and only if) the weights are loaded
    key = _measurement_key(digest, ctx.dataset_version, config, ctx.suites, seq_len)
    if (m := _cache_get(key, config)) is not None:
        return m
    model, digest, manifest = _load(path, ctx)
    m = _measure(model, digest, int(manifest.get("step", 0)), ctx, config, seq_len)
    _cache_put(key, m, config)
    return m


# --- the entry points --------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    dataset_manifest: str | Path,
    config: EvalConfig,
    *,
    previous_best: str | Path | None = None,
    out_dir: str | Path,
    suite_dir: str | Path | None = None,
) -> EvalReport:
    """Evaluate a checkpoint; write `out_dir/results.json` (every per-document and per-item result)
    before returning the report. Raises on failure: use `safe_evaluate` where nothing may escape."""
    t_start = time.perf_counter()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    checkpoint_dir = Path(checkpoint_dir)
    ctx = _context(dataset_manifest, config, suite_dir)
    model, digest, manifest = _load(checkpoint_dir, ctx)
    step = int(manifest.get("step", 0))
    seq_len = min(config.seq_len, model.config.max_seq_len)
    timings: dict[str, float] = {"load_s": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    current = _measure(model, digest, step, ctx, config, seq_len)
    timings["heldout_s"] = current.heldout.seconds
    timings["suites_s"] = current.heldout.settings.get("suites_seconds", 0.0)
    _cache_put(_measurement_key(digest, ctx.dataset_version, config, ctx.suites, seq_len), current, config)
    timings["measure_s"] = time.perf_counter() - t0

    parity: dict[str, dict[str, Any]] = {}
    if config.parity.enabled:
        t0 = time.perf_counter()
        ids = sample_sequences(ctx.manifest_path, config.parity.sequences,
                               min(config.parity.seq_len, model.config.max_seq_len))
        parity = run_parity(model, ids, config.parity, pad_id=ctx.pad_id)
        timings["parity_s"] = time.perf_counter() - t0
    retrieval: dict[str, float] | None = None
    retrieval_note: str | None = "skipped: evaluator.retrieval.enabled is false"
    if config.retrieval.enabled:
        from .retrieval_gain import retrieval_gain  # bm25s and data prep's packing: only when measured

        t0 = time.perf_counter()
        retrieval, retrieval_note = retrieval_gain(model, ctx.manifest_path, ctx.sp,
                                                   max_windows=config.retrieval.max_windows,
                                                   batch_size=config.batch_size, seed=config.retrieval.seed)
        timings["retrieval_s"] = time.perf_counter() - t0
    del model

    metrics = current.heldout.metrics()
    scored_suites = [s for s in current.suites if s.n > 0]  # a suite whose every item was skipped has no score
    suite_scores = {s.name: s.score for s in scored_suites}
    suite_retrieval = {s.name: s.retrieval for s in current.suites if s.retrieval}
    suite_notes = {s.name: _skip_note(s) for s in current.suites if s.skipped}
    if scored_suites:
        metrics["suite_mean"] = sum(suite_scores.values()) / len(suite_scores)

    gates: list[GateResult] = []
    references: dict[str, dict[str, Any]] = {}
    tests: dict[str, PairedTest] = {}
    t0 = time.perf_counter()
    for name, ref_path in (("previous_best", previous_best), ("baseline", config.baseline_checkpoint)):
        if ref_path is None:
            continue
        ref_path = Path(ref_path)
        try:
            ref = _reference(ref_path, ctx, config, seq_len)
        except Exception as exc:  # an unusable reference is an 'error' gate, not a crash
            gates.append(GateResult(name=f"reference[{name}]", passed=False, detail=json.dumps(
                {"verdict": "error", "reference": name, "checkpoint": str(ref_path),
                 "error": f"{type(exc).__name__}: {exc}"})))
            references[name] = {"checkpoint": str(ref_path), "error": f"{type(exc).__name__}: {exc}"}
            continue
        references[name] = {"checkpoint": str(ref_path), "digest": ref.digest, "step": ref.step,
                            "metrics": ref.heldout.metrics(),
                            "suite_scores": {s.name: s.score for s in ref.suites if s.n > 0}}
        if ref.digest == digest:
            continue  # comparing a checkpoint with itself proves nothing
        g, t = regression_gates(
            name, current.heldout, ref.heldout, scored_suites, [s for s in ref.suites if s.n > 0],
            ppl_max_increase=config.gates.val_ppl_max_increase, suite_max_drop=config.gates.suite_max_drop,
            samples=config.bootstrap_samples, confidence=config.confidence, seed=config.seed,
        )
        gates += g
        tests.update(t)
    timings["references_s"] = time.perf_counter() - t0
    gates += absolute_gates(metrics["val_ppl"], suite_scores, max_val_ppl=config.gates.max_val_ppl,
                            min_suite_scores=config.gates.min_suite_scores)
    if parity and config.gates.require_parity:
        failed = sorted(k for k, v in parity.items() if not v.get("passed"))
        gates.append(GateResult(name="parity", passed=not failed, detail=json.dumps(
            {"verdict": "regression" if failed else "pass", "failed": failed, "checks": sorted(parity)})))

    verdicts = {gate_verdict(g.detail) for g in gates if not g.passed}
    verdict: Verdict = "error" if "error" in verdicts else "regression" if verdicts else "pass"
    error = None
    if verdict == "error":
        error = "; ".join(f"{g.name}: {json.loads(g.detail).get('error', '')}" for g in gates
                          if not g.passed and gate_verdict(g.detail) == "error")
    timings["total_s"] = time.perf_counter() - t_start

    report = EvalReport(
        checkpoint=str(checkpoint_dir), digest=digest, step=step, dataset_version=ctx.dataset_version,
        dataset_manifest=str(ctx.manifest_path), is_final=manifest.get("meta", {}).get("reason") == "final",
        metrics=metrics, domain_metrics=current.heldout.domain_metrics(), suite_scores=suite_scores,
        suite_retrieval=suite_retrieval, suite_notes=suite_notes, parity=parity,
        retrieval=retrieval, retrieval_note=retrieval_note, gates=gates, verdict=verdict, error=error, references=references, timings=timings,
    )
    out = Path(out_dir) / RESULTS_FILE
    report.results_path = str(out)
    results = {
        "format": RESULTS_FORMAT,
        "report": report.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "measurement": current.to_json(),
        "paired_tests": {k: v.to_json() for k, v in tests.items()},
    }
    atomic_write_bytes(out, json.dumps(results, allow_nan=True).encode())
    log.info("evaluator.evaluated", checkpoint=str(checkpoint_dir), step=step, verdict=verdict,
             val_ppl=metrics["val_ppl"], seconds=round(timings["total_s"], 2))
    return report


def _skip_note(s: SuiteResult) -> str:
    """One line: how many items of a suite were skipped, and the first reason."""
    first = next(iter(s.skipped.values()))
    return f"{len(s.skipped)} of {len(s.skipped) + s.n} items skipped ({first})"


def safe_evaluate(
    checkpoint_dir: str | Path,
    dataset_manifest: str | Path,
    config: EvalConfig,
    *,
    previous_best: str | Path | None = None,
    out_dir: str | Path,
    suite_dir: str | Path | None = None,
) -> EvalReport:
    """`evaluate_checkpoint` that never raises: any failure (a corrupt checkpoint, a missing dataset,
    a bug) becomes a report with verdict 'error' and the reason; the results file says so too."""
    try:
        return evaluate_checkpoint(checkpoint_dir, dataset_manifest, config, previous_best=previous_best,
                                   out_dir=out_dir, suite_dir=suite_dir)
    except Exception as exc:  # the verdict carries it
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("evaluator.failed", checkpoint=str(checkpoint_dir), error=reason)
        step, meta = 0, {}
        try:
            m = read_checkpoint_manifest(checkpoint_dir)
            step, meta = int(m.get("step", 0)), m.get("meta", {}) or {}
        except Exception:  # the manifest itself may be what is broken
            pass
        digest = None
        manifest = Path(checkpoint_dir) / MANIFEST_FILE
        if manifest.is_file():
            digest = sha256_file(manifest)
        report = EvalReport(checkpoint=str(checkpoint_dir), digest=digest, step=step,
                            dataset_version=meta.get("dataset_version"), dataset_manifest=str(dataset_manifest),
                            is_final=meta.get("reason") == "final", verdict="error", error=reason,
                            gates=[GateResult(name="evaluation", passed=False,
                                              detail=json.dumps({"verdict": "error", "error": reason}))])
        try:
            out = Path(out_dir) / RESULTS_FILE
            atomic_write_bytes(out, json.dumps({"format": RESULTS_FORMAT, "report": report.model_dump(mode="json")},
                                               allow_nan=True).encode())
            report.results_path = str(out)
        except OSError as write_exc:
            log.warning("evaluator.results_unwritable", error=str(write_exc))
        return report


def _local_ref(path: Path, digest: str | None = None) -> ArtifactRef:
    if path.is_file():
        return ArtifactRef(uri=path.resolve().as_uri(), sha256=digest or sha256_file(path), size_bytes=path.stat().st_size)
    if digest is None:  # no file and no digest: nothing real to reference (no made-up all-zero SHA-256)
        raise EvaluationError(f"{path} does not exist, so EvaluationCompleted cannot reference it: pass checkpoint_ref=")
    return ArtifactRef(uri=path.resolve().as_uri(), sha256=digest, size_bytes=0)


def evaluation_completed(
    report: EvalReport,
    *,
    checkpoint_ref: ArtifactRef | None = None,
    results_ref: ArtifactRef | None = None,
    evaluator: str = "",
    is_final: bool | None = None,
) -> EvaluationCompleted:
    """The EvaluationCompleted payload of a report. Pass the store's refs when publishing (the
    defaults are file:// refs of the local paths)."""
    if checkpoint_ref is None:
        checkpoint_ref = _local_ref(Path(report.checkpoint) / MANIFEST_FILE, report.digest)
    if results_ref is None and report.results_path and Path(report.results_path).is_file():
        results_ref = _local_ref(Path(report.results_path))
    return EvaluationCompleted(
        checkpoint=checkpoint_ref,
        checkpoint_digest=report.digest or checkpoint_ref.sha256,
        step=report.step,
        metrics=report.metrics,
        domain_metrics=report.domain_metrics,
        suite_scores=report.suite_scores,
        parity=report.parity,
        verdict=report.verdict,
        gates=report.gates,
        gates_passed=report.verdict == "pass" and report.gates_passed,
        results=results_ref,
        error=report.error,
        evaluator=evaluator,
        is_final=report.is_final if is_final is None else is_final,
        retrieval=report.retrieval,
        suite_retrieval=report.suite_retrieval or None,
    )


def format_report(report: EvalReport) -> str:
    """A few readable lines: verdict, headline metrics, per-domain, suites, parity, failed gates."""
    m = report.metrics
    lines = [f"checkpoint {report.checkpoint} (step {report.step}): {report.verdict.upper()}"]
    if report.error:
        lines.append(f"  error: {report.error}")
    if "val_loss" in m:
        lines.append(f"  val_loss {m['val_loss']:.4f}  ppl {m['val_ppl']:.3f}  bits/byte {m['bits_per_byte']:.4f}  "
                     f"({int(m['val_tokens'])} tokens, {m['val_tokens_per_s']:.0f} tok/s)")
    for name, d in sorted(report.domain_metrics.items()):
        lines.append(f"    {name:<12} loss {d['loss']:.4f}  ppl {d['ppl']:.3f}  bpb {d['bits_per_byte']:.4f}  "
                     f"docs {int(d['documents'])}")
    if report.retrieval:
        from .retrieval_gain import format_retrieval

        lines.append(f"  {format_retrieval(report.retrieval)}")
    elif report.retrieval_note:
        lines.append(f"  retrieval gain {report.retrieval_note}")
    for name, s in sorted(report.suite_scores.items()):
        r = report.suite_retrieval.get(name)
        extra = (f"  (retrieval items: {r['score_with']:.3f} with context, {r['score_without']:.3f} without, "
                 f"gain {r['gain']:+.3f} over {int(r['n'])})" if r else "")
        lines.append(f"  suite {name:<24} {s:.3f}{extra}")
    for name, note in sorted(report.suite_notes.items()):
        lines.append(f"  suite {name:<24} {note}")
    for name, p in sorted(report.parity.items()):
        nums = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items() if k != "passed")
        lines.append(f"  parity {name:<14} {'ok' if p.get('passed') else 'FAILED'}  {nums}")
    for g in report.gates:
        lines.append(f"  gate {g.name}: {'pass' if g.passed else 'FAIL'} {g.detail if not g.passed else ''}".rstrip())
    if report.results_path:
        lines.append(f"  results: {report.results_path}")
    return "\n".join(lines)


def run_cli_eval(
    checkpoint: str | Path,
    suite_dir: str | Path | None,
    dataset: str | Path,
    out: str | Path,
    *,
    previous_best: str | Path | None = None,
    config: EvalConfig | None = None,
) -> str:
    """`helox eval`: evaluate one checkpoint (safely) and return a printable summary."""
    cfg = config or EvalConfig()
    if suite_dir is not None:
        cfg = cfg.model_copy(update={"suites_dir": Path(suite_dir)})
    report = safe_evaluate(checkpoint, dataset, cfg, previous_best=previous_best, out_dir=out)
    return format_report(report)
