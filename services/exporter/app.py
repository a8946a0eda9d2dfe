"""exporter wiring: EvaluationCompleted (gates passed) or TrainingCompleted -> export -> ModelReady.

Which event triggers an export, and of which checkpoint, is the run's `export` section
(ExportConfig.on / .checkpoint). Idempotent by checkpoint digest: a redelivered event, or
a second exporter instance, finds the digest done (and the export directory complete).
The export runs in a worker thread; the bus keeps the entry's claim alive meanwhile.
The run's config comes from the file the event references (`run_config`, verified by
digest); its SHA-256 is the run's config hash in the model's lineage.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import ValidationError

from contracts import Envelope, EvaluationCompleted, Lineage, ModelReady, RunFailed, TrainingCompleted
from shared.artifacts import ArtifactDigestError, ArtifactOutsideStoreError
from shared.bus import Delivery
from shared.cancellation import honour_cancellations, is_cancelled
from shared.checkpoint import CheckpointError
from shared.logging import get_logger
from shared.runs import RunConfigError, read_run_config, section, stages
from shared.service import ServiceRuntime
from shared.version import code_version

from .config import ExportConfig
from .export import (
    ExportDecision,
    ExportError,
    checkpoint_to_export,
    dataset_tokenizer,
    export_checkpoint,
    model_ready_payload,
    rag_template_of,
)

log = get_logger("helox.exporter")


class ExporterService:
    def __init__(self, rt: ServiceRuntime) -> None:
        self.rt = rt

    async def handle(self, env: Envelope[EvaluationCompleted | TrainingCompleted], delivery: Delivery) -> None:
        rt, run_id = self.rt, env.run_id
        if not run_id:
            return
        if await is_cancelled(rt, run_id):
            log.info("run cancelled; not exporting", run_id=run_id, event=env.type)
            return
        ref = env.payload.run_config
        if ref is None:
            log.warning("event carries no run_config reference; not exporting", run_id=run_id, event=env.type)
            return
        try:
            run_config = await asyncio.to_thread(read_run_config, rt.store, ref)
            if "export" not in stages(run_config):
                return
            config = ExportConfig.model_validate(section(run_config, "export"))
        except RunConfigError as exc:
            await self._fail(f"cannot export: {exc}", type(exc).__name__)
            return
        except ValidationError as exc:
            await self._fail(f"invalid export config: {exc}", "ValidationError")
            return
        best = await rt.idempotency.result(f"best:{run_id}")
        decision = checkpoint_to_export(config, env.payload, best_val_loss=float(best) if best else None)
        if decision is None or await rt.idempotency.seen(decision.digest):
            return
        key = rt.settings.signing_key
        if key is None:
            await self._fail("HELOX_SIGNING_KEY is not set: exports must be signed", "ConfigError")
            return
        rt.current_work = f"exporting {run_id} ({decision.reason})"
        try:
            ready = await asyncio.to_thread(self._export, decision, config, ref.sha256, run_id,
                                            key.get_secret_value(), _metrics(env.payload),
                                            getattr(env.payload, "retrieval", None))
        except (CheckpointError, ExportError, FileNotFoundError) as exc:
            await self._fail(f"export of {decision.checkpoint.uri} failed: {exc}", type(exc).__name__)
            await rt.idempotency.commit(decision.digest, "failed")
            return
        except Exception as exc:
            if delivery.delivery_count < rt.settings.max_deliveries:
                raise
            await self._fail(f"export failed after {delivery.delivery_count} attempts: {exc!r}", type(exc).__name__)
            await rt.idempotency.commit(decision.digest, "failed")
            return
        finally:
            rt.current_work = None
        await rt.bus.publish(ready)
        await rt.idempotency.commit(decision.digest, ready.model_id)
        loss = ready.metrics.get("val_loss")
        if loss is not None:
            await rt.idempotency.commit(f"best:{run_id}", str(loss))
        log.info("model ready", model_id=ready.model_id, formats=sorted(ready.formats))

    def _export(self, decision: ExportDecision, config: ExportConfig, config_hash: str, run_id: str, key: str,
                metrics: dict[str, float], retrieval: dict[str, float] | None = None) -> ModelReady:
        store = self.rt.store
        # Inputs through the verified cache (s3://) or verified in place: the checkpoint's manifest
        # by the digest the event carries, its files and the dataset's against their manifests.
        try:
            checkpoint_dir = store.open_directory(decision.checkpoint)
        except (ArtifactDigestError, ArtifactOutsideStoreError) as exc:
            raise ExportError(f"checkpoint {decision.checkpoint.uri} unusable: {exc}") from exc
        meta = json.loads((checkpoint_dir / "manifest.json").read_text()).get("meta", {})
        dataset_version = meta.get("dataset_version")
        if not dataset_version:
            raise ExportError(f"{checkpoint_dir} does not name its dataset version; cannot find its tokenizer")
        try:
            dataset_manifest = store.dataset_manifest(dataset_version)
        except (ArtifactDigestError, ArtifactOutsideStoreError) as exc:
            raise ExportError(f"dataset {dataset_version} unusable: {exc}") from exc
        tokenizer = dataset_tokenizer(dataset_manifest)
        result = export_checkpoint(
            checkpoint_dir, tokenizer, None, store.path(config.out_dir), run_id=run_id,
            dataset_version=dataset_version, config_hash=config_hash, signing_key=key, config=config,
            metrics=metrics, expected_digest=decision.digest, code_version=code_version(),
            rag_template=rag_template_of(dataset_manifest), retrieval=retrieval,
        )
        step = decision.step if decision.step is not None else int(json.loads(
            (checkpoint_dir / "manifest.json").read_text()).get("step", 0))
        lineage = Lineage(run_id=run_id, dataset_version=dataset_version, checkpoint_step=step,
                          checkpoint_digest=decision.digest, config_hash=config_hash, code_version=code_version())
        return model_ready_payload(result, store, metrics, lineage)

    async def _fail(self, reason: str, error_type: str) -> None:
        log.error("export failed", reason=reason)
        await self.rt.bus.publish(RunFailed(stage="export", reason=reason[:2000], error_type=error_type))


def _metrics(event: Any) -> dict[str, float]:
    if isinstance(event, EvaluationCompleted):
        return {k: float(v) for k, v in event.metrics.items()}
    out = {"final_loss": float(event.final_loss)}
    if event.best_val_loss is not None:
        out["best_val_loss"] = float(event.best_val_loss)
    return out


def setup(rt: ServiceRuntime) -> None:
    svc = ExporterService(rt)
    rt.bus.subscribe(EvaluationCompleted, svc.handle)
    rt.bus.subscribe(TrainingCompleted, svc.handle)
    honour_cancellations(rt)  # a cancelled run is not exported
