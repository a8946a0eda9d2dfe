"""Event payload models, one per event type. Every field is typed and documented.

Artifact references carry URI + SHA-256 + size (ArtifactRef), never bytes.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from .envelope import ArtifactRef, ContractModel, Event

Stage = Literal["data", "train", "health", "eval", "export"]
FailedStage = Literal["request", "data", "train", "health", "eval", "export"]
"""Where a run stopped: a stage, or `request` (its request was refused before any work)."""
Severity = Literal["info", "warning", "critical"]
Scalar = float | int | str | bool | None


# --- runs -----------------------------------------------------------------------------


class RunRequested(Event):
    """Somebody (the CLI, an API) asks for a run: data prep, then the requested stages."""

    EVENT_TYPE = "RunRequested"
    SCHEMA_VERSION = "1.1"

    name: str = Field(description="Human-readable run name.")
    stages: list[Literal["data", "train", "eval", "export"]] = Field(
        default_factory=lambda: ["data", "train", "eval", "export"],
        description="Pipeline stages this run asks for, in order.",
    )
    config: dict[str, Any] = Field(
        description="The resolved run configuration (helox.runconfig.RunConfig as JSON), inline; "
        "each service validates the section it owns."
    )
    config_hash: str = Field(description="SHA-256 of the canonical JSON of `config`.")
    requested_by: str = Field(default="cli", description="Who asked: user@host or a service name.")
    run_config: ArtifactRef | None = Field(
        default=None,
        description="The validated run configuration written to the artifact store "
        "(runs/<run_id>/config.json, canonical JSON: its SHA-256 is `config_hash`). "
        "Absent: data-prep validates `config` and writes that file itself.",
    )


class RunFailed(Event):
    """A run stopped for good in some stage."""

    EVENT_TYPE = "RunFailed"
    SCHEMA_VERSION = "1.1"

    stage: FailedStage = Field(description="Stage in which the run failed; `request`: the request was refused "
                         "before any work, `reason` naming each bad field (`section.field`).")
    reason: str = Field(description="What went wrong, in words a user can act on.")
    error_type: str = Field(default="", description="Exception class or error code.")
    retriable: bool = Field(default=False, description="Whether a retry could succeed.")


class RunCancelled(Event):
    """An operator cancelled a run (`helox cancel RUN_ID`): every service stops its work for the
    run and skips the run's later events; the stage that was working ends it with RunFailed
    (error_type `Cancelled`)."""

    EVENT_TYPE = "RunCancelled"
    SCHEMA_VERSION = "1.0"

    reason: str = Field(default="", description="Why it was cancelled, in the operator's words.")
    requested_by: str = Field(default="cli", description="Who cancelled it: user@host or a service name.")


# --- data -----------------------------------------------------------------------------


class DataPrepProgress(Event):
    """Progress of the data-prep pipeline (telemetry, trimmed)."""

    EVENT_TYPE = "DataPrepProgress"
    SCHEMA_VERSION = "1.0"

    stage: str = Field(description="Pipeline stage: ingest, exact_dedup, near_dedup, semantic_dedup, tokenizer, tokenize, manifest.")
    fraction: float = Field(ge=0.0, le=1.0, description="Fraction of this stage done.")
    detail: str = Field(default="", description="Free text, e.g. counts so far.")


class DatasetReady(Event):
    """A versioned, deduplicated, tokenized dataset is in the artifact store."""

    EVENT_TYPE = "DatasetReady"
    SCHEMA_VERSION = "1.1"

    dataset_version: str = Field(description="Content-derived version id of the dataset.")
    manifest: ArtifactRef = Field(description="The dataset manifest (JSON).")
    tokenizer: ArtifactRef = Field(description="The sentencepiece model file.")
    vocab_size: int = Field(gt=0, description="Tokenizer vocabulary size.")
    tokens: dict[str, int] = Field(description="Token counts per split (train, validation).")
    domains: list[str] = Field(description="Domain names present in the dataset.")
    documents: int = Field(ge=0, description="Documents kept after filtering and deduplication.")
    reused: bool = Field(default=False, description="True when an identical version already existed.")
    parent_version: str | None = Field(default=None, description="Version this one derives from (lineage).")
    run_config: ArtifactRef | None = Field(
        default=None,
        description="The run's configuration file in the artifact store (runs/<run_id>/config.json): "
        "the trainer reads its `train` section from it.",
    )


# --- training -------------------------------------------------------------------------


class TrainingStarted(Event):
    """The trainer started (or resumed) a run."""

    EVENT_TYPE = "TrainingStarted"
    SCHEMA_VERSION = "1.1"

    dataset_version: str = Field(description="Dataset being trained on.")
    model_preset: str = Field(description="Model preset name, e.g. 'tiny' or '125m'.")
    n_params: int = Field(gt=0, description="Trainable parameters.")
    total_steps: int = Field(gt=0, description="Optimizer steps planned.")
    world_size: int = Field(default=1, ge=1, description="Processes in the job (torchrun).")
    device: str = Field(description="Device type, e.g. cpu or cuda:0.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(description="Compute precision.")
    resumed_from_step: int | None = Field(default=None, description="Step resumed from, if any.")
    instance: str = Field(default="", description="Trainer instance running the job.")
    run_config: ArtifactRef | None = Field(
        default=None,
        description="The run's configuration file in the artifact store (runs/<run_id>/config.json): "
        "the health monitor reads the run's `health` thresholds from it.",
    )


class TrainingMetrics(Event):
    """Metrics the trainer emits every `log_every` steps (telemetry, trimmed)."""

    EVENT_TYPE = "TrainingMetrics"
    SCHEMA_VERSION = "1.1"

    step: int = Field(ge=0, description="Optimizer step just completed.")
    tokens_seen: int = Field(ge=0, description="Training tokens consumed so far.")
    loss: float = Field(description="Training loss (may be NaN/Infinity when training breaks).")
    lr: float = Field(description="Learning rate used for this step: lr_schedule x lr_curriculum x lr_control x lr_fault.")
    lr_schedule: float | None = Field(default=None, description="Learning rate of the warmup/cosine schedule at this step.")
    lr_curriculum: float | None = Field(default=None, description="Batch-size LR factor, sqrt(batch / reference batch).")
    lr_control: float | None = Field(default=None, description="Operator and policy LR cuts so far (survive rollbacks).")
    lr_fault: float | None = Field(default=None, description="Injected lr_multiply fault factor (1 without one).")
    grad_norm: float = Field(description="Global gradient norm before clipping.")
    grad_norm_per_layer: dict[str, float] = Field(default_factory=dict, description="Gradient norm per layer.")
    loss_scale: float | None = Field(default=None, description="fp16 GradScaler scale, None when not used.")
    skipped_steps: int = Field(default=0, ge=0, description="Steps skipped as non-finite/overflowing so far.")
    tokens_per_s: float = Field(default=0.0, description="Training throughput over the last interval.")
    mfu: float | None = Field(default=None, description="Model FLOPs utilisation (0-1) against the configured peak.")
    seq_len: int = Field(gt=0, description="Sequence length in use.")
    batch_size: int = Field(gt=0, description="Global batch size in sequences.")
    probes: dict[str, float] = Field(default_factory=dict, description="Latest probe values by name.")
    domain_loss: dict[str, float] = Field(default_factory=dict, description="Loss per data domain.")
    val_loss: float | None = Field(default=None, description="Validation loss, when evaluated this interval.")
    data_cursor: int | None = Field(default=None, description="Global sample cursor of the data stream.")


class CheckpointSaved(Event):
    """A checkpoint is durable in the artifact store."""

    EVENT_TYPE = "CheckpointSaved"
    SCHEMA_VERSION = "1.1"

    step: int = Field(ge=0, description="Step the checkpoint captures.")
    tokens_seen: int = Field(ge=0, description="Tokens consumed at that step.")
    checkpoint: ArtifactRef = Field(description="The checkpoint's manifest.json.")
    digest: str = Field(description="Checkpoint digest (SHA-256 of its manifest): its identity.")
    dataset_version: str = Field(description="Dataset the run trains on.")
    train_loss: float | None = Field(default=None, description="Training loss at that step.")
    val_loss: float | None = Field(default=None, description="Validation loss, if measured.")
    reason: Literal["interval", "final", "signal", "command", "rollback-point"] = Field(
        default="interval", description="Why it was written."
    )
    is_final: bool = Field(default=False, description="True for the checkpoint that ends the run.")
    run_config: ArtifactRef | None = Field(
        default=None,
        description="The run's configuration file in the artifact store (runs/<run_id>/config.json): "
        "the evaluator reads its `eval` section from it.",
    )


class TrainerAction(Event):
    """A decision the trainer applied, with its reason (the audit trail of the closed loop)."""

    EVENT_TYPE = "TrainerAction"
    SCHEMA_VERSION = "1.0"

    action: Literal[
        "rollback", "skip_data", "scale_lr", "pause", "resume", "checkpoint", "stop", "halt", "record"
    ] = Field(description="What was done.")
    reason: str = Field(description="Why, in words.")
    step: int = Field(ge=0, description="Step at which it was applied.")
    alert_event_id: uuid.UUID | None = Field(default=None, description="HealthAlert answered, if any.")
    command_event_id: uuid.UUID | None = Field(default=None, description="TrainerCommand answered, if any.")
    details: dict[str, Scalar] = Field(default_factory=dict, description="Parameters, e.g. lr_factor, restored_step.")


class TrainingCompleted(Event):
    """Training finished normally."""

    EVENT_TYPE = "TrainingCompleted"
    SCHEMA_VERSION = "1.2"

    final_step: int = Field(ge=0, description="Last optimizer step.")
    tokens_seen: int = Field(ge=0, description="Training tokens consumed.")
    final_loss: float = Field(description="Training loss at the end.")
    best_val_loss: float | None = Field(default=None, description="Best validation loss seen.")
    final_checkpoint: ArtifactRef = Field(description="Manifest of the final checkpoint.")
    final_checkpoint_digest: str = Field(description="Digest of the final checkpoint.")
    best_checkpoint: ArtifactRef | None = Field(default=None, description="Manifest of the best checkpoint.")
    wall_time_s: float = Field(ge=0, description="Wall-clock training time.")
    rollbacks: int = Field(default=0, ge=0, description="Rollbacks performed.")
    skipped_steps: int = Field(default=0, ge=0, description="Non-finite steps skipped.")
    run_config: ArtifactRef | None = Field(
        default=None,
        description="The run's configuration file in the artifact store (runs/<run_id>/config.json): "
        "the exporter reads its `export` section from it.",
    )
    observer_failures: dict[str, int] = Field(
        default_factory=dict,
        description="Errors of observers (metric emitters, W&B, the bus emitter) by callback: logged and "
        "counted, not fatal to the run.",
    )


class TrainerCommand(Event):
    """An operator's (or a service's) command to a running trainer."""

    EVENT_TYPE = "TrainerCommand"
    SCHEMA_VERSION = "1.0"

    command: Literal["pause", "resume", "checkpoint", "stop", "rollback", "scale_lr", "skip_data"] = Field(
        description="What the trainer should do."
    )
    value: float | None = Field(default=None, description="Argument, e.g. the LR factor for scale_lr or samples for skip_data.")
    reason: str = Field(default="", description="Why it was asked.")


# --- health ---------------------------------------------------------------------------

AlertKind = Literal[
    "non_finite",
    "loss_spike",
    "divergence",
    "stagnation",
    "grad_explosion",
    "loss_scale_collapse",
    "dead_neurons",
    "attention_entropy_collapse",
    "rare_token_collapse",
    "token_drift",
    "throughput_drop",
    "trainer_stalled",
]
RecommendedAction = Literal["rollback", "rollback_cut_lr", "cut_lr", "skip_data", "record", "notify", "halt"]


class AlertEvidence(ContractModel):
    """The numbers behind an alert."""

    statistic: str = Field(description="What was measured, e.g. 'robust_z(loss)'.")
    value: float = Field(description="Its value at detection.")
    threshold: float = Field(description="The threshold it crossed.")
    window: dict[str, float] = Field(default_factory=dict, description="Window statistics (median, mad, mean, n...).")
    values: list[float] = Field(default_factory=list, description="Recent values of the watched series.")
    layer: str | None = Field(default=None, description="Layer at fault, for per-layer detectors.")


class HealthAlert(Event):
    """An incident detected in the metrics stream (state=firing), or its resolution (state=resolved)."""

    EVENT_TYPE = "HealthAlert"
    SCHEMA_VERSION = "1.0"

    incident_id: str = Field(description="Stable id of the incident; the resolution repeats it.")
    kind: AlertKind = Field(description="Detector that fired.")
    severity: Severity = Field(description="info, warning or critical.")
    state: Literal["firing", "resolved"] = Field(default="firing", description="Firing or resolved.")
    step_start: int = Field(ge=0, description="First step of the incident.")
    step_end: int = Field(ge=0, description="Last step observed in the incident.")
    evidence: AlertEvidence = Field(description="Window statistics, threshold and crossing values.")
    recommended_action: RecommendedAction = Field(description="What the monitor recommends.")
    message: str = Field(description="One-line summary for humans.")


# --- evaluation -----------------------------------------------------------------------


class GateResult(ContractModel):
    """One quality gate's outcome."""

    name: str = Field(description="Gate name, e.g. 'val_ppl_regression'.")
    passed: bool = Field(description="Whether the gate passed.")
    detail: str = Field(default="", description="Evidence: estimate, confidence interval, threshold.")


class EvaluationCompleted(Event):
    """A checkpoint has been judged."""

    EVENT_TYPE = "EvaluationCompleted"
    SCHEMA_VERSION = "1.3"

    checkpoint: ArtifactRef = Field(description="The checkpoint evaluated.")
    checkpoint_digest: str = Field(description="Its digest (the idempotency key).")
    step: int = Field(ge=0, description="Training step of the checkpoint.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Headline metrics: val_loss, val_ppl, bits_per_byte...")
    domain_metrics: dict[str, dict[str, float]] = Field(default_factory=dict, description="Metrics per data domain.")
    suite_scores: dict[str, float] = Field(default_factory=dict, description="Score per test suite.")
    parity: dict[str, dict[str, Scalar]] = Field(default_factory=dict, description="Parity checks and their results.")
    verdict: Literal["pass", "regression", "error"] = Field(description="Overall verdict.")
    gates: list[GateResult] = Field(default_factory=list, description="Each gate's outcome.")
    gates_passed: bool = Field(description="True when every gate passed.")
    results: ArtifactRef | None = Field(default=None, description="Full per-item results in the artifact store.")
    error: str | None = Field(default=None, description="Why evaluation failed, for verdict=error.")
    evaluator: str = Field(default="", description="Instance that evaluated it.")
    is_final: bool = Field(default=False, description="True when the checkpoint is the run's final one.")
    run_config: ArtifactRef | None = Field(
        default=None,
        description="The run's configuration file in the artifact store (runs/<run_id>/config.json): "
        "the exporter reads its `export` section from it.",
    )
    retrieval: dict[str, float] | None = Field(
        default=None,
        description="Retrieval gain of a run trained with retrieved context (a `rag:` section), on validation "
        "windows: loss of the base tokens (nats/token: loss_without, loss_with, loss_random; bits/byte: "
        "bpb_without, bpb_with, bpb_random) without context, with retrieved chunks and with random chunks of "
        "equal length (the control); gain = without - with, control_gain = without - random (and *_bpb), "
        "windows, chunks. None for a run without a `rag:` section.",
    )
    suite_retrieval: dict[str, dict[str, float]] | None = Field(
        default=None,
        description="Suites with retrieval-conditioned items (a run trained with retrieved context): per suite, "
        "n (items scored both ways), score_with (mean item score, prompts with the retrieved chunks laid out as "
        "training packed them), score_without (the same items, nothing retrieved), gain = with - without, "
        "context_tokens_per_item. None when no suite has such items or the run has no `rag:` section.",
    )


# --- export ---------------------------------------------------------------------------


class Lineage(ContractModel):
    """Where a model comes from."""

    run_id: str = Field(description="Training run.")
    dataset_version: str = Field(description="Dataset version trained on.")
    checkpoint_step: int = Field(ge=0, description="Step of the exported checkpoint.")
    checkpoint_digest: str = Field(description="Digest of the exported checkpoint.")
    config_hash: str = Field(description="Hash of the resolved run config.")
    code_version: str = Field(description="Helox version (and git revision when known).")
    parent_model_id: str | None = Field(default=None, description="Model this one was fine-tuned from.")


class ModelReady(Event):
    """An exported, verified, signed model is published. Cyrex subscribes to this."""

    EVENT_TYPE = "ModelReady"
    SCHEMA_VERSION = "1.0"

    model_id: str = Field(description="Unique model id.")
    formats: dict[str, ArtifactRef] = Field(description="Export manifest or main file per format: safetensors, hf, onnx, gguf.")
    manifest: ArtifactRef = Field(description="The export manifest (files, digests, fingerprint) that is signed.")
    fingerprint: str = Field(description="SHA-256 over sorted (name, dtype, shape, bytes) of the tensors.")
    signature: str = Field(description="HMAC-SHA256 of the export manifest, hex.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Headline evaluation metrics.")
    lineage: Lineage = Field(description="Run, dataset, checkpoint, config and code it derives from.")
    model_card: ArtifactRef | None = Field(default=None, description="README.md model card.")


# --- operations -----------------------------------------------------------------------


class ServiceHeartbeat(Event):
    """Liveness of one service instance (telemetry, trimmed)."""

    EVENT_TYPE = "ServiceHeartbeat"
    SCHEMA_VERSION = "1.0"

    service: str = Field(description="Service name: data-prep, trainer, health-monitor, evaluator, exporter.")
    instance: str = Field(description="Instance name (stable per process).")
    pid: int = Field(description="OS process id.")
    host: str = Field(description="Host name.")
    version: str = Field(description="Helox version.")
    status: Literal["starting", "idle", "busy", "stopping"] = Field(description="What the instance is doing.")
    current_work: str | None = Field(default=None, description="The job in hand, e.g. 'run r1 step 120'.")
    started_at: datetime = Field(description="When the instance started.")
    interval_s: float = Field(default=5.0, description="Seconds between heartbeats: silence for 3x this means dead.")


class DeadLetter(Event):
    """A message that could not be handled: kept with everything needed to inspect or replay it."""

    EVENT_TYPE = "DeadLetter"
    SCHEMA_VERSION = "1.0"

    original_stream: str = Field(description="Stream the message came from.")
    original_id: str = Field(description="Its Redis entry id.")
    original_fields: dict[str, str] = Field(description="The raw entry fields (bytes decoded with replacement).")
    error: str = Field(description="Why it failed.")
    error_type: str = Field(description="Exception class, or 'decode'/'schema'/'version'.")
    group: str = Field(description="Consumer group that failed it.")
    consumer: str = Field(description="Consumer that dead-lettered it.")
    delivery_count: int = Field(ge=0, description="Deliveries before it was dead-lettered.")
    event_type: str | None = Field(default=None, description="Event type, if the envelope could be read.")


# --- retrieval (RAG-aware training; Cyrex serves it over Synapse) ----------------------


class RetrieverHeartbeat(Event):
    """A retriever (a Cyrex instance) announces itself and what it serves (telemetry, trimmed).

    Requesters discover retrievers by reading the newest heartbeats: one newer than
    3 x `interval_s` means the instance is alive and serves `request_topic`.
    """

    EVENT_TYPE = "RetrieverHeartbeat"
    SCHEMA_VERSION = "1.0"

    name: str = Field(description="Retriever name, e.g. 'cyrex'.")
    instance: str = Field(description="Instance name (stable per process).")
    version: str = Field(description="The retriever's software version.")
    index_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 identifying the index it serves.")
    index_chunks: int = Field(ge=0, description="Chunks in the index.")
    index_documents: int = Field(ge=0, description="Source documents in the index.")
    method: Literal["bm25", "dense", "hybrid"] = Field(default="bm25", description="How it ranks chunks.")
    embedding_model: str | None = Field(default=None, description="Embedding model name (dense or hybrid only).")
    max_k: int = Field(gt=0, description="Most chunks it returns per query.")
    request_topic: str = Field(default="retrieval.requested",
                               description="Topic key (without the deployment prefix) it serves requests on.")
    status: Literal["ready", "indexing", "stopping"] = Field(default="ready", description="Whether it answers now.")
    interval_s: float = Field(default=5.0, gt=0, description="Seconds between heartbeats.")


class RetrievalQuery(ContractModel):
    """One query of a retrieval request."""

    query_id: str = Field(min_length=1, description="Id unique within the request; results carry it back.")
    text: str = Field(description="The query text.")
    k: int = Field(gt=0, le=256, description="Chunks wanted (a retriever may return fewer, up to its max_k).")
    exclude_source_ids: list[str] = Field(
        default_factory=list, description="Source documents whose chunks must not be returned (leakage control)."
    )


class RetrievalRequested(Event):
    """A batch of retrieval queries (request/reply over Synapse, correlated by `request_id`).

    At-least-once: a retriever may see a request twice and answers it again with the same
    `request_id`; requesters keep the first answer. A request past its `deadline` is not
    answered (the requester has already fallen back).
    """

    EVENT_TYPE = "RetrievalRequested"
    SCHEMA_VERSION = "1.0"

    request_id: str = Field(min_length=1, description="Correlates the RetrievalCompleted answer.")
    requester: str = Field(description="Instance that asks, e.g. 'data-prep-1'.")
    queries: list[RetrievalQuery] = Field(min_length=1, description="The queries, answered together.")
    deadline: datetime = Field(description="UTC time after which an answer is useless.")
    retriever: str | None = Field(default=None, description="Instance asked for; None: any instance.")


class RetrievedChunk(ContractModel):
    """One retrieved chunk."""

    chunk_id: str = Field(description="The chunk's id in the retriever's index.")
    source_id: str = Field(description="Id of the document it comes from (what exclude_source_ids names).")
    text: str = Field(description="The chunk's text.")
    score: float = Field(description="Retrieval score (higher is better; scale is the retriever's).")


class RetrievalResult(ContractModel):
    """The answer to one query: chunks, best first, or an error."""

    query_id: str = Field(description="The query answered.")
    chunks: list[RetrievedChunk] = Field(default_factory=list, description="Chunks, best first.")
    error: str | None = Field(default=None, description="Why this query could not be answered, if it could not.")


class RetrievalCompleted(Event):
    """A retriever's answer to one RetrievalRequested."""

    EVENT_TYPE = "RetrievalCompleted"
    SCHEMA_VERSION = "1.0"

    request_id: str = Field(min_length=1, description="The request answered.")
    retriever: str = Field(description="Retriever name, e.g. 'cyrex'.")
    instance: str = Field(description="Instance that answered.")
    index_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="Index the chunks come from.")
    results: list[RetrievalResult] = Field(description="One result per query of the request.")
    elapsed_ms: float = Field(default=0.0, ge=0, description="Time the retriever spent on the request.")
    error: str | None = Field(default=None, description="Why the whole request failed, if it did.")


class RetrievalFallback(Event):
    """A requester stopped using a retriever and fell back to another (a warning, never silent)."""

    EVENT_TYPE = "RetrievalFallback"
    SCHEMA_VERSION = "1.0"

    stage: Stage = Field(description="Stage that fell back: data (packing) or eval.")
    from_retriever: str | None = Field(description="Retriever given up on (instance), None when none was found.")
    to_retriever: str = Field(description="Retriever used instead, e.g. 'local-bm25'.")
    reason: str = Field(description="Why: not discovered in time, timed out, malformed results, died.")
    queries: int = Field(ge=0, description="Queries the fallback answers.")
