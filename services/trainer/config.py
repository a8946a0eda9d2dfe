"""Training configuration: one pydantic model with a section per component (extra keys refused)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from shared.config import StrictModel
from shared.model import PRESETS, ModelConfig, model_preset


class MuonConfig(StrictModel):
    """Muon's own settings (`optim.name: muon`): it updates the 2-D hidden matrices only."""

    lr: float = Field(default=0.02, gt=0, description="Muon's peak LR; the schedule scales it as it scales optim.lr.")
    momentum: float = Field(default=0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(default=5, ge=1, description="Newton-Schulz iterations of the orthogonalisation.")
    weight_decay: float | None = Field(default=None, ge=0, description="Decoupled decay; None: optim.weight_decay.")
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = Field(
        default="original", description="original: lr x sqrt(max(1, rows/cols)); match_rms_adamw: 0.2 x sqrt(max).")


class OptimConfig(StrictModel):
    name: Literal["adamw", "muon"] = Field(
        default="adamw", description="muon: Muon for the 2-D hidden matrices, AdamW (optim.lr) for embeddings, "
        "head and norms (modded-nanogpt, nanochat).")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate (at batch.global_batch_size).")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warmup steps.")
    decay_steps: int | None = Field(default=None, ge=1, description="Cosine length (default: max_steps).")
    schedule: Literal["cosine", "constant", "wsd"] = Field(
        default="cosine", description="After the warmup: cosine to min_lr_ratio; constant; wsd (warmup-stable-decay): "
        "the peak until the last cooldown_fraction of decay_steps, then a straight line to min_lr_ratio.")
    cooldown_fraction: float = Field(default=0.4, gt=0, le=1, description="wsd: the share of decay_steps spent "
                                     "cooling down (counted from the end).")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW decay on matrices (not on norms/gains).")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    fused: bool | None = Field(default=None, description="Fused AdamW; None: where the device supports it.")
    muon: MuonConfig = Field(default_factory=MuonConfig)


class BatchConfig(StrictModel):
    global_batch_size: int = Field(default=32, gt=0, description="Sequences per optimizer step, all ranks together.")
    micro_batch_size: int | Literal["auto"] = Field(
        default=8, description="Sequences per forward per rank; 'auto' probes the largest that fits (GPU)."
    )
    seq_len: int = Field(default=256, gt=1, description="Full training sequence length.")


class StabilityConfig(StrictModel):
    clip_norm: float | None = Field(default=1.0, gt=0, description="Global-norm clipping threshold; None: off.")
    adaptive_clip: bool = Field(default=False, description="Clip at mean + sigma*std of recent norms (capped by clip_norm).")
    adaptive_window: int = Field(default=100, ge=2)
    adaptive_sigma: float = Field(default=3.0, gt=0)
    adaptive_min_history: int = Field(default=20, ge=2, description="Norms seen before the adaptive threshold applies.")
    max_consecutive_skips: int = Field(
        default=5, ge=1, description="Non-finite steps in a row that raise an internal non_finite alert (policy decides)."
    )
    z_loss: float = Field(default=0.0, ge=0, description="z-loss multiplier on log(sum(exp(logits)))^2 (OLMo: 1e-4).")


class NoiseScaleConfig(StrictModel):
    enabled: bool = Field(default=False, description="Estimate the gradient noise scale (needs >= 2 micro-batches).")
    grow: bool = Field(default=False, description="Double the global batch when B_noise exceeds it by grow_ratio.")
    ema: float = Field(default=0.95, ge=0, lt=1)
    grow_ratio: float = Field(default=2.0, gt=1)
    max_global_batch_size: int | None = Field(default=None, gt=0)
    min_steps_between: int = Field(default=100, ge=1)


class CurriculumConfig(StrictModel):
    seq_len_start: int | None = Field(default=None, gt=1, description="Sequence-length warmup start; None: off.")
    seq_len_warmup_steps: int = Field(default=0, ge=0)
    seq_len_multiple: int = Field(default=8, ge=1, description="Warmup lengths are rounded to this multiple.")
    keep_tokens_constant: bool = Field(
        default=True, description="During the warmup, more (shorter) sequences per batch keep tokens per step constant."
    )
    batch_ramp: list[tuple[int, int]] = Field(
        default_factory=list, description="(from_step, global_batch_size) pairs; the last one reached applies."
    )
    scale_lr_with_batch: bool = Field(default=True, description="Adam LR x sqrt(batch / global_batch_size).")
    noise_scale: NoiseScaleConfig = Field(default_factory=NoiseScaleConfig)


class ProbeConfig(StrictModel):
    enabled: bool = True
    every: int = Field(default=100, ge=1, description="Probe cadence in steps.")
    batch_size: int = Field(default=4, ge=1, description="Sequences of the step's batch the probes look at.")
    dead_unit_ratio: float = Field(
        default=0.01, gt=0, description="An MLP unit is dead below this fraction of the mean |activation|."
    )
    rare_token_quantile: float = Field(
        default=0.5, gt=0, lt=1, description="Rarest tokens carrying this share of the vocabulary."
    )


class CheckpointConfig(StrictModel):
    every: int | None = Field(default=1000, ge=1, description="Interval in steps; None: only at the end / on request.")
    keep_last: int = Field(default=3, ge=1)
    keep_best: bool = True
    background: bool = Field(default=True, description="Write snapshots on a background thread.")
    at_start: bool = Field(default=False, description="Write a step-0 checkpoint (a rollback point before any update).")
    write_duty_cycle: float = Field(
        default=0.5, gt=0, le=1,
        description="Busy fraction of the background writer (it sleeps the rest): spreads its CPU use over more "
        "steps so that no step stalls much on a small CPU; 1.0 writes as fast as possible.",
    )
    dirname: str = Field(default="checkpoints", description="Sub-directory of the run's out_dir.")


class EvalConfig(StrictModel):
    every: int | None = Field(default=None, ge=1, description="Validation cadence in steps; None: off.")
    batches: int = Field(default=8, ge=1, description="Validation micro-batches per evaluation.")


class WandbConfig(StrictModel):
    mode: Literal["disabled", "offline", "online"] = Field(
        default="offline", description="offline: files under out_dir/wandb (sync later); online needs WANDB_API_KEY."
    )
    project: str = "helox"
    entity: str | None = None
    name: str | None = None


class LogConfig(StrictModel):
    every: int = Field(default=10, ge=1, description="Metrics emission cadence in steps.")
    structlog: bool = Field(default=True, description="Emit metrics as structured log lines.")
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class MixingConfig(StrictModel):
    enabled: bool = Field(default=False, description="Online domain mixing (EXP3 over domain losses).")
    update_every: int = Field(default=10, ge=1)
    smoothing: float = Field(default=0.9, ge=0, lt=1, description="EMA factor of the importance-weighted rewards.")
    min_weight: float = Field(default=0.02, ge=0, le=1)
    max_weight: float = Field(default=0.9, gt=0, le=1)
    initial_weights: dict[str, float] | None = None


class FaultConfig(StrictModel):
    """Fault injection for drills; everything off by default. Each fault fires once per run
    (the slowdown, once begun, lasts: a rollback restores the model, not the machine)."""

    lr_multiply_step: int | None = Field(default=None, ge=1)
    lr_multiply_factor: float = Field(default=100.0, gt=0)
    corrupt_batch_step: int | None = Field(default=None, ge=1, description="Replace that step's batch with noise tokens.")
    nan_param_step: int | None = Field(default=None, ge=1, description="Poison one parameter with NaN before that step.")
    nan_param_name: str | None = Field(default=None, description="Which parameter (default: the first MLP matrix).")
    slowdown_step: int | None = Field(default=None, ge=1, description="From that step on, every step takes "
                                      "slowdown_factor x as long (a throttled or shared accelerator); lasts the run.")
    slowdown_factor: float = Field(default=2.0, ge=1, description="How much longer each step takes.")


class DistributedConfig(StrictModel):
    strategy: Literal["auto", "none", "ddp", "fsdp"] = Field(
        default="auto", description="auto: DDP when launched by torchrun with WORLD_SIZE > 1."
    )
    zero: bool = Field(default=False, description="ZeroRedundancyOptimizer on the DDP path.")
    cpu_offload: bool = Field(default=False, description="FSDP2 CPUOffloadPolicy.")
    backend: str | None = Field(default=None, description="nccl on GPU, gloo on CPU by default.")
    nproc: int = Field(
        default=1, ge=1, le=64,
        description="Local processes the trainer service launches the job on (torchrun, rank 0 talks to the bus); "
        "1: in the service's own process. Ignored when already launched by torchrun.",
    )
    timeout_s: float = Field(
        default=1800.0, gt=0,
        description="Collective timeout of the process group: how long a rank waits for a peer that stopped "
        "answering before it fails (a dead peer fails at once).",
    )


class ControlConfig(StrictModel):
    max_rollbacks: int = Field(default=3, ge=0, description="Rollbacks before the policy halts the run.")
    lr_cut: float = Field(default=0.5, gt=0, lt=1, description="LR factor after a rollback for instability.")
    spike_repeat: int = Field(default=3, ge=1, description="Spikes within spike_window_steps that count as divergence.")
    spike_window_steps: int = Field(default=500, ge=1)
    rules: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Override: alert kind -> actions (rollback, skip_data, scale_lr, record, notify, halt).",
    )


class TrainConfig(StrictModel):
    """Everything a training run needs except the data (given as a batch source)."""

    model: ModelConfig | str = Field(default="tiny", description="A ModelConfig or a preset name.")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="Applied on top of a preset.")
    max_steps: int = Field(default=1000, ge=1)
    seed: int = 0
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = Field(default=False, description="torch.compile the model.")
    fused_loss: bool = Field(
        default=True, description="Output head and loss in one blocked pass (shared.model.loss) where the run is "
        "fp32 on one process; off: logits, then F.cross_entropy.")
    peak_flops: float | None = Field(default=None, gt=0, description="Device peak FLOP/s for MFU (default: a table by device).")
    dataset_version: str | None = None
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    probes: ProbeConfig = Field(default_factory=ProbeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)

    @field_validator("model")
    @classmethod
    def _known_preset(cls, value: ModelConfig | str) -> ModelConfig | str:
        # A ValueError, so that an unknown name is a validation error naming train.model (a
        # KeyError from model_preset would escape validation as a crash).
        if isinstance(value, str) and value not in PRESETS:
            raise ValueError(f"unknown model preset {value!r}; choose one of {sorted(PRESETS)} or give a ModelConfig")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        try:
            cfg = self.model_config_resolved()
        except ValidationError as exc:  # name the field as the user wrote it: model_overrides.n_layer
            field = "model" if isinstance(self.model, ModelConfig) and not self.model_overrides else "model_overrides"
            raise ValidationError.from_exception_data(exc.title, [
                {"type": e["type"], "loc": (field, *e["loc"]), "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})}
                for e in exc.errors()
            ]) from exc
        if self.batch.seq_len > cfg.max_seq_len:
            raise ValueError(f"batch.seq_len ({self.batch.seq_len}) exceeds the model's max_seq_len ({cfg.max_seq_len})")
        start = self.curriculum.seq_len_start
        if start is not None and start > self.batch.seq_len:
            raise ValueError(f"curriculum.seq_len_start ({start}) exceeds batch.seq_len ({self.batch.seq_len})")
        if self.optim.name == "muon" and (self.distributed.zero or self.distributed.strategy == "fsdp"):
            # ZeRO and FSDP2 shard what Muon orthogonalises whole; the DDP path keeps matrices whole.
            raise ValueError("optim.name 'muon' runs on one process or DDP, not with distributed.zero or fsdp")
        if isinstance(self.batch.micro_batch_size, int) and self.batch.micro_batch_size <= 0:
            raise ValueError("batch.micro_batch_size must be a positive integer or 'auto'")
        return self

    def model_config_resolved(self) -> ModelConfig:
        """The ModelConfig: the preset (with model_overrides) or the explicit config."""
        if isinstance(self.model, ModelConfig):
            return ModelConfig(**{**self.model.model_dump(), **self.model_overrides}) if self.model_overrides else self.model
        return model_preset(self.model, **self.model_overrides)

    @property
    def preset_name(self) -> str:
        return self.model if isinstance(self.model, str) else "custom"
