"""Export one checkpoint: watermark, write every format, check each against PyTorch, sign.

    export_checkpoint(...) -> ExportResult        the whole job (no bus, no Redis)
    model_ready_payload(result, store, ...)        the contracts.ModelReady to publish
    checkpoint_to_export(config, event)           the export policy (on / checkpoint)

An export lives in `<out_dir>/<checkpoint digest[:24]>/` (idempotent by checkpoint digest):

    manifest.json     canonical JSON: files + SHA-256, fingerprint, lineage, formats, parity
    signature.json    HMAC-SHA256 of manifest.json (key id, algorithm)
    README.md         the model card
    rag_template.json the prompt template of a model trained with retrieved context (RAG-packed
                      dataset only): boundary tokens, k, context budget, window; Cyrex reads it
    native/ hf/ onnx/ gguf/ [tensorrt/]

It is built in a hidden temporary directory and renamed into place; a complete, valid export
of the same checkpoint (same key, formats and watermark) is returned as is (`reused=True`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from contracts import ArtifactRef, EvaluationCompleted, Lineage, ModelReady, TrainingCompleted
from shared.artifacts import ArtifactStore, atomic_write_bytes, fsync_dir, sha256_file
from shared.checkpoint import MANIFEST_FILE as CHECKPOINT_MANIFEST
from shared.checkpoint import load_model, verify_checkpoint
from shared.model import Llama
from shared.version import code_version as current_code_version

from . import gguf_export, hf, native, onnx_export, tensorrt
from .config import FORMATS, GGUF_TYPES, ExportConfig
from .provenance import (
    SIGNATURE_ALGORITHM,
    canonical_json,
    canonical_tensors,
    fingerprint,
    key_id,
    model_card,
    provenance_metadata,
    sign,
)
from .verify import EXPORT_FORMAT, MANIFEST_FILE, SIGNATURE_FILE, read_manifest, verify_export
from .watermark import derive_watermark_key, detect_watermark, embed_watermark

MODEL_CARD_FILE = "README.md"
RAG_TEMPLATE_FILE = "rag_template.json"
PARITY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "def add(x, y=3):\n    return x + y * 12\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n"
)


class ExportError(RuntimeError):
    """The export could not be produced."""


class ExportParityError(ExportError):
    """A written format does not reproduce the PyTorch model within tolerance."""


@dataclass
class ExportResult:
    """What `export_checkpoint` produced; `manifest` is the signed document itself."""

    path: Path
    model_id: str
    fingerprint: str
    signature: str
    manifest_path: Path
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "bytes"}
    formats: dict[str, dict[str, Any]]  # format -> manifest entry (or {"status": "skipped", "reason"})
    parity: dict[str, dict[str, Any]]
    lineage: dict[str, Any]
    watermark: dict[str, Any] | None
    model_card_path: Path
    reused: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, str]:
        """format -> why it was not written (e.g. TensorRT without a GPU)."""
        return {k: v.get("reason", "") for k, v in self.formats.items() if v.get("status") == "skipped"}

    def digests(self) -> dict[str, str]:
        return {rel: e["sha256"] for rel, e in self.files.items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:48] or "model"


def parity_inputs(tokenizer_path: str | Path, vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    """[batch, seq_len] token ids from real text (tokenized), topped up with seeded random ids."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = [i for i in sp.encode(PARITY_TEXT) if i < vocab_size]
    need = batch * seq_len
    if len(ids) < need:
        g = torch.Generator().manual_seed(0)
        ids += torch.randint(4, vocab_size, (need - len(ids),), generator=g).tolist()
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, seq_len)


def dataset_tokenizer(dataset_manifest: str | Path) -> Path:
    """The sentencepiece model of a prepared dataset (its manifest's `tokenizer.path`, verified)."""
    from shared.data.manifest import load_manifest

    dataset_manifest = Path(dataset_manifest)
    manifest = load_manifest(dataset_manifest)
    base = dataset_manifest if dataset_manifest.is_dir() else dataset_manifest.parent
    path = base / manifest.tokenizer.path
    if not path.is_file() or sha256_file(path) != manifest.tokenizer.sha256:
        raise ExportError(f"tokenizer {path} is missing or does not match the dataset manifest {dataset_manifest}")
    return path


def rag_template_of(dataset_manifest: str | Path) -> dict[str, Any] | None:
    """The prompt template of a RAG-packed dataset (what `rag_template.json` holds); None when the
    dataset was not packed with retrieved context."""
    from shared.data.config import RAG_BOUNDARY_TOKENS, RagConfig
    from shared.data.manifest import load_manifest

    manifest = load_manifest(dataset_manifest)
    if manifest.rag is None:
        return None
    k = (manifest.config.get("rag") or {}).get("k", RagConfig().k)
    missing = [t for t in RAG_BOUNDARY_TOKENS if t not in manifest.rag.boundary_ids]
    if missing:
        raise ExportError(f"dataset manifest {dataset_manifest}: rag.boundary_ids lacks {missing}")
    chunk_open, chunk_close, doc_marker = RAG_BOUNDARY_TOKENS
    return {"chunk_open": chunk_open, "chunk_close": chunk_close, "doc_marker": doc_marker, "k": int(k),
            "context_budget": float(manifest.rag.context_budget), "seq_len": int(manifest.rag.seq_len)}


def check_rag_template(template: Mapping[str, Any], tokenizer_path: str | Path) -> dict[str, Any]:
    """The template as written: markers, k > 0, 0 < context_budget <= 1, seq_len > 0 (optional);
    every marker must be a user-defined piece of the tokenizer (one token the model was trained
    on). Raises ExportError otherwise."""
    t = dict(template)
    markers = [t.get(m) for m in ("chunk_open", "chunk_close", "doc_marker")]
    try:
        k, budget = int(t["k"]), float(t["context_budget"])
        seq_len = int(t["seq_len"]) if t.get("seq_len") is not None else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"invalid RAG prompt template {t}: {exc!r}") from exc
    if not all(isinstance(m, str) and m for m in markers) or k < 1 or not 0 < budget <= 1 or (
            seq_len is not None and seq_len < 1):
        raise ExportError(f"invalid RAG prompt template {t}: markers must be non-empty strings, k >= 1, "
                          "0 < context_budget <= 1, seq_len >= 1")
    pieces = hf.user_defined_pieces(tokenizer_path)
    bad = [m for m in markers if m not in pieces]
    if bad:
        raise ExportError(f"RAG markers {bad} are not user-defined pieces of tokenizer {tokenizer_path} "
                          f"(it has {sorted(pieces)}): export with the tokenizer of the RAG-packed dataset")
    out = {"chunk_open": markers[0], "chunk_close": markers[1], "doc_marker": markers[2], "k": k,
           "context_budget": budget}
    return {**out, "seq_len": seq_len} if seq_len is not None else out


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    skip = {MANIFEST_FILE, SIGNATURE_FILE}
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel not in skip:
            out[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def _reusable(path: Path, key: str | bytes, wm_key_id: str | None, options: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete, valid export made with the same key, options and watermark; else None."""
    if not (path / MANIFEST_FILE).is_file():
        return None
    try:
        manifest, _ = read_manifest(path)
    except (OSError, ValueError):
        return None
    if manifest.get("options") != options:
        return None
    if (manifest.get("watermark") or {}).get("key_id") != wm_key_id:
        return None
    report = verify_export(path, key, check_watermark=False, check_loads=False)
    return manifest if report.ok and report.status("signature") == "pass" else None


def _result_from(path: Path, manifest: dict[str, Any], signature: str, *, reused: bool,
                 timings: dict[str, float] | None = None) -> ExportResult:
    return ExportResult(
        path=path, model_id=manifest["model_id"], fingerprint=manifest["fingerprint"], signature=signature,
        manifest_path=path / MANIFEST_FILE, manifest=manifest, files=manifest["files"],
        formats=manifest["formats"], parity=manifest["parity"], lineage=manifest["lineage"],
        watermark=manifest.get("watermark"), model_card_path=path / MODEL_CARD_FILE, reused=reused,
        timings_s=dict(timings or manifest.get("timings_s", {})),
    )


def export_checkpoint(
    checkpoint_dir: str | Path,
    tokenizer_path: str | Path,
    formats: list[str] | tuple[str, ...] | None,
    out_dir: str | Path,
    *,
    run_id: str,
    dataset_version: str | None,
    config_hash: str | None,
    signing_key: str | bytes,
    watermark_key: str | bytes | None = None,
    config: ExportConfig | None = None,
    metrics: Mapping[str, float] | None = None,
    expected_digest: str | None = None,
    code_version: str | None = None,
    gguf_types: list[str] | tuple[str, ...] | None = None,
    rag_template: Mapping[str, Any] | None = None,
    retrieval: Mapping[str, float] | None = None,
) -> ExportResult:
    """Export a verified checkpoint into `out_dir/<digest[:24]>/` and return what was written.

    `formats` overrides `config.formats` and `gguf_types` `config.gguf_types` when given.
    `config_hash` is the run config's hash; None (an offline export, no run) leaves it out of
    the lineage and the files' metadata rather than writing a made-up one. The watermark key
    defaults to one derived from the signing key. Raises CheckpointCorruptError for a bad checkpoint, ExportParityError
    when a format does not match PyTorch (with config.parity.fail_on_mismatch), ExportError when
    the finished export fails its own verification.

    `rag_template` (`rag_template_of` the dataset, for a model trained with retrieved context)
    is written as rag_template.json, listed in the signed manifest and shown in the model card,
    with the evaluator's `retrieval` gain figures when given.
    """
    cfg = config or ExportConfig()
    wanted = list(dict.fromkeys(formats if formats is not None else cfg.formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if gguf_types is not None:
        types = list(dict.fromkeys(gguf_types))
        unknown = [t for t in types if t not in GGUF_TYPES]
        if unknown or not types:
            raise ExportError(f"unknown GGUF type(s) {unknown or types} in gguf_types; choose from {list(GGUF_TYPES)}")
        cfg = cfg.model_copy(update={"gguf_types": types})
    if "tensorrt" in wanted and "onnx" not in wanted:
        wanted.insert(wanted.index("tensorrt"), "onnx")  # the engine is built from the ONNX graph
    checkpoint_dir, out_root = Path(checkpoint_dir), Path(out_dir)
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer_path} does not exist: pass the dataset's tokenizer.model")

    digest = verify_checkpoint(checkpoint_dir, expected_digest)
    ck_manifest = json.loads((checkpoint_dir / CHECKPOINT_MANIFEST).read_text())
    step = int(ck_manifest["step"])
    meta = ck_manifest.get("meta") or {}
    dataset_version = dataset_version or meta.get("dataset_version") or "unknown"
    wm_key = (watermark_key if watermark_key is not None else derive_watermark_key(signing_key)) \
        if cfg.watermark.enabled else None
    wm_key_id = key_id(wm_key) if wm_key is not None else None
    options = {"formats": wanted, "gguf_types": list(cfg.gguf_types), "onnx_kv_cache": cfg.onnx_kv_cache,
               "watermark_strength": cfg.watermark.strength if cfg.watermark.enabled else None}
    template = check_rag_template(rag_template, tokenizer_path) if rag_template is not None else None
    if template is not None:
        options["rag_template"] = template

    final = out_root / digest[:24]
    existing = _reusable(final, signing_key, wm_key_id, options)
    if existing is not None:
        sig = json.loads((final / SIGNATURE_FILE).read_text())["signature"]
        return _result_from(final, existing, sig, reused=True)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, model_config = load_model(checkpoint_dir, expected_digest=digest)
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    watermark_info: dict[str, Any] | None = None
    if wm_key is not None:
        state = embed_watermark(state, model_config, wm_key, strength=cfg.watermark.strength)
        model = Llama(model_config)
        model.load_state_dict(state, strict=True)
        model.eval()
        res = detect_watermark(state, model_config, wm_key, max_false_positive=cfg.watermark.max_false_positive)
        if not res.detected:
            raise ExportError(f"the watermark is not detectable after embedding (z={res.z:.2f}); raise "
                              "watermark.strength")
        watermark_info = {"scheme": res.scheme, "key_id": res.key_id, "strength": cfg.watermark.strength,
                          "z": round(res.z, 3), "units": res.units, "max_false_positive": res.max_false_positive}
    timings["load_and_watermark"] = time.perf_counter() - t0

    fp = fingerprint(canonical_tensors(state, tied=model_config.tie_embeddings))
    model_id = f"{_slug(run_id)}-s{step}-{fp[:12]}"
    code_version = code_version or current_code_version()
    lineage = {"run_id": run_id, "dataset_version": dataset_version, "checkpoint_step": step,
               "checkpoint_digest": digest, "code_version": code_version}
    if config_hash is not None:
        lineage["config_hash"] = config_hash
    prov = provenance_metadata(fingerprint=fp, model_id=model_id, run_id=run_id, dataset_version=dataset_version,
                               checkpoint_step=step, checkpoint_digest=digest, config_hash=config_hash,
                               code_version=code_version, watermark_key_id=wm_key_id)
    inputs = parity_inputs(tokenizer_path, model_config.vocab_size, cfg.parity.batch,
                           min(cfg.parity.seq_len, model_config.max_seq_len))

    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{digest[:24]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries, parity = _write_formats(tmp, wanted, model, state, tokenizer_path, prov, cfg, inputs, model_id,
                                         timings)
        n_params = model.num_params()
        card = model_card(model_id=model_id, provenance=prov, model_config=model_config.model_dump(mode="json"),
                          n_params=n_params, formats=entries, metrics=metrics, watermark=watermark_info,
                          parity=parity, rag_template=template, retrieval=retrieval)
        (tmp / MODEL_CARD_FILE).write_text(card)
        if template is not None:
            atomic_write_bytes(tmp / RAG_TEMPLATE_FILE, json.dumps(template, indent=1, sort_keys=True).encode())
        manifest = {
            "format": EXPORT_FORMAT,
            "model_id": model_id,
            "fingerprint": fp,
            "created_at": datetime.now(UTC).isoformat(),
            "lineage": lineage,
            "model_config": model_config.model_dump(mode="json"),
            "n_params": n_params,
            "tokenizer": f"{entries['native']['path']}/{native.TOKENIZER_FILE}" if "native" in entries else None,
            "formats": entries,
            "parity": parity,
            "watermark": watermark_info,
            "metrics": {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(float(v))},
            "options": options,
            "model_card": MODEL_CARD_FILE,
            **({"rag_template": RAG_TEMPLATE_FILE} if template is not None else {}),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "files": _file_table(tmp),
        }
        signature = sign(manifest, signing_key)
        atomic_write_bytes(tmp / MANIFEST_FILE, canonical_json(manifest))
        atomic_write_bytes(tmp / SIGNATURE_FILE, json.dumps(
            {"algorithm": SIGNATURE_ALGORITHM, "signature": signature, "key_id": key_id(signing_key),
             "manifest": MANIFEST_FILE}, indent=1).encode())
        if cfg.verify_after_export:
            # check_loads=False: parity has just run every file in its own runtime, stock settings.
            report = verify_export(tmp, signing_key, watermark_key=wm_key, check_loads=False)
            if not report.ok:
                raise ExportError(f"the export failed its own verification:\n{report.summary()}")
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total"] = time.perf_counter() - t0
    return _result_from(final, manifest, signature, reused=False, timings=timings)


def _write_formats(root: Path, wanted: list[str], model: Llama, state: dict[str, torch.Tensor], tokenizer_path: Path,
                   prov: dict[str, str], cfg: ExportConfig, inputs: torch.Tensor, model_id: str,
                   timings: dict[str, float]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    entries: dict[str, dict[str, Any]] = {}
    parity: dict[str, dict[str, Any]] = {}
    p = cfg.parity
    mc = model.config
    for fmt in wanted:
        t = time.perf_counter()
        if fmt == "native":
            entries[fmt] = native.write_native(root / "native", state, mc, tokenizer_path, prov)
        elif fmt == "hf":
            entries[fmt] = hf.write_hf(root / "hf", model, tokenizer_path, prov)
        elif fmt == "onnx":
            entries[fmt] = onnx_export.write_onnx(root / "onnx", model, prov, kv_cache=cfg.onnx_kv_cache,
                                                  exporter=cfg.onnx_exporter)
        elif fmt == "gguf":
            entries[fmt] = gguf_export.write_gguf(root / "gguf", state, mc, tokenizer_path, prov,
                                                  types=tuple(cfg.gguf_types), model_id=model_id)
        elif fmt == "tensorrt":
            entries[fmt] = tensorrt.write_tensorrt(root / "tensorrt", root / "onnx" / onnx_export.MODEL_FILE,
                                                   max_seq_len=mc.max_seq_len)
        timings[f"{fmt}.write"] = time.perf_counter() - t
        if entries[fmt].get("status") == "skipped":
            parity[fmt] = {"status": "skipped", "passed": True, "reason": entries[fmt]["reason"]}
            continue
        t = time.perf_counter()
        with torch.no_grad():
            if fmt == "native":
                parity[fmt] = native.check_native(root / "native", model, inputs)
            elif fmt == "hf":
                parity[fmt] = hf.check_hf(root / "hf", model, inputs, tokenizer_path, atol=p.atol,
                                          max_new_tokens=p.max_new_tokens)
            elif fmt == "onnx":
                parity[fmt] = onnx_export.check_onnx(root / "onnx", model, inputs, atol=p.atol)
            elif fmt == "gguf":
                parity[fmt] = gguf_export.check_gguf(root / "gguf", model, tokenizer_path, f32_atol=p.gguf_f32_atol,
                                                     min_top1_quantized=p.gguf_min_top1_quantized,
                                                     decided_margin=p.gguf_decided_margin, tie_margin=p.gguf_tie_margin)
            elif fmt == "tensorrt":
                parity[fmt] = tensorrt.check_tensorrt(root / "tensorrt", model, inputs)
        timings[f"{fmt}.parity"] = time.perf_counter() - t
        if p.fail_on_mismatch and not parity[fmt].get("passed", False):
            raise ExportParityError(f"{fmt} export does not match the PyTorch model: {parity[fmt]}")
    return entries, parity


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished export to its final name, replacing an incomplete or stale one."""
    fsync_dir(tmp)
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# --- what the service publishes ---------------------------------------------------------------


def model_ready_payload(
    result: ExportResult, store: ArtifactStore, metrics: Mapping[str, float] | None = None,
    lineage: Lineage | None = None,
) -> ModelReady:
    """The ModelReady event for an export inside `store` (URIs + SHA-256 from the manifest).

    An offline export has no run config hash, which ModelReady's lineage requires: pass
    `lineage`, or export through the service.
    """

    def ref(rel: str) -> ArtifactRef:
        entry = result.files[rel]
        return ArtifactRef(uri=store.uri(result.path / rel), sha256=entry["sha256"], size_bytes=entry["bytes"])

    formats: dict[str, ArtifactRef] = {}
    for name, entry in result.formats.items():
        if entry.get("status") == "skipped":
            continue
        formats[name] = ref(entry["main"])
        if entry.get("kv_cache"):
            formats[f"{name}_kv"] = ref(entry["kv_cache"])
        for quant, rel in (entry.get("files") or {}).items():
            formats[f"{name}_{quant}"] = ref(rel)
    signature = result.path / SIGNATURE_FILE
    if store.is_remote and signature.is_file():
        store.ref(signature)  # the detached signature (not listed in the manifest) goes up before it
    manifest_ref = store.ref(result.manifest_path)  # s3://: every listed file first, verified; the manifest last
    if lineage is None:
        if "config_hash" not in result.lineage:
            raise ExportError(f"{result.path} is an offline export (no run config hash): ModelReady needs the run's "
                              "lineage; pass lineage= or export through the exporter service")
        lineage = Lineage(**result.lineage)
    chosen = metrics if metrics is not None else result.manifest.get("metrics", {})
    return ModelReady(
        model_id=result.model_id, formats=formats, manifest=manifest_ref, fingerprint=result.fingerprint,
        signature=result.signature, metrics={k: float(v) for k, v in chosen.items()}, lineage=lineage,
        model_card=ref(result.manifest["model_card"]),
    )


# --- the export policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportDecision:
    """Which checkpoint to export, and why."""

    checkpoint: ArtifactRef  # the checkpoint's manifest.json
    digest: str
    step: int | None
    reason: str


def checkpoint_to_export(
    config: ExportConfig, event: EvaluationCompleted | TrainingCompleted, *, best_val_loss: float | None = None
) -> ExportDecision | None:
    """Apply `config.on` / `config.checkpoint` to an incoming event; None: nothing to export.

    - on=eval_passed, checkpoint=final: an evaluation of the final checkpoint that passed every gate.
    - on=eval_passed, checkpoint=best: any passing evaluation whose val_loss beats `best_val_loss`
      (the best the caller exported so far for the run; None: nothing exported yet).
    - on=training_completed: the run's final (or best, falling back to final) checkpoint.
    """
    if config.on == "training_completed":
        if not isinstance(event, TrainingCompleted):
            return None
        if config.checkpoint == "best" and event.best_checkpoint is not None:
            return ExportDecision(event.best_checkpoint, event.best_checkpoint.sha256, None, "best checkpoint of the run")
        return ExportDecision(event.final_checkpoint, event.final_checkpoint_digest, event.final_step,
                              "training completed")
    if not isinstance(event, EvaluationCompleted):
        return None
    if event.verdict != "pass" or not event.gates_passed:
        return None
    if config.checkpoint == "final":
        if not event.is_final:
            return None
        return ExportDecision(event.checkpoint, event.checkpoint_digest, event.step, "final checkpoint passed evaluation")
    loss = event.metrics.get("val_loss")
    if loss is None or not math.isfinite(loss):
        return None
    if best_val_loss is not None and loss >= best_val_loss:
        return None
    return ExportDecision(event.checkpoint, event.checkpoint_digest, event.step,
                          f"passed evaluation with the best val_loss so far ({loss:.4g})")
