"""The training loop: wires the components; each concern lives in its own module.

    Trainer(config, data, out_dir, ...).fit(resume=None | "latest" | path) -> TrainingResult
    run_training(config, data, out_dir, ...)                                  (the same, one call)

One step: apply control decisions -> plan (curriculum) -> fetch micro-batches -> forward/
backward under autocast -> unscale -> global/per-layer grad norms -> refuse non-finite
steps or clip -> optimizer step -> hooks (step_end, probe, log, eval, checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import queue
import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.checkpoint import (
    Checkpoint,
    CheckpointInfo,
    CheckpointNotFoundError,
    latest_valid_checkpoint,
    list_checkpoints,
    remove_checkpoints_after,
)
from shared.logging import get_logger
from shared.model import Llama

from .batching import NoiseScale, find_micro_batch_size
from .checkpointing import TrainCheckpointer
from .config import TrainConfig
from .control import Action, ActionKind, Alert, Command, ControlError, ControlPolicy
from .curriculum import Curriculum, StepPlan
from .data import BatchSource
from .distributed import DistContext, build_optimizer, init_distributed, wrap_model
from .faults import FaultInjector
from .hooks import Callback, Event, Hooks
from .metrics import StructlogEmitter, Throughput, WandbEmitter, device_peak_flops, finite_or_none, mfu
from .mixing import OnlineDomainMixer
from .optim import LRSchedule, set_lr
from .precision import Precision, resolve_precision
from .probes import ProbeContext, default_probes
from .stability import GradNorms, StabilityGuard

log = get_logger("helox.trainer")

STATE_FORMAT = 1
_HISTORY = 50_000  # steps of per-step loss and data-cursor history kept in memory
Status = Literal["completed", "stopped", "halted"]


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to do."""


@dataclass
class StepResult:
    step: int
    loss: float
    applied: bool
    grad_norm: float
    grad_norm_per_layer: dict[str, float]
    lr: float
    tokens: int
    seq_len: int
    global_batch: int
    clip_coef: float
    domain_loss: dict[str, float]
    skip_reason: str = ""


@dataclass
class TrainingResult:
    status: Status
    final_step: int
    tokens: int
    final_loss: float | None
    best_val_loss: float | None
    last_checkpoint: Path | None
    last_checkpoint_digest: str | None
    best_checkpoint: Path | None
    checkpoints: list[Path]
    skipped_steps: int
    rollbacks: int
    wall_time_s: float
    reason: str = ""
    losses: dict[int, float] = field(default_factory=dict)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    last_loss: float | None = None
    last_val_loss: float | None = None
    last_val_step: int | None = None
    best_val_loss: float | None = None
    probe_values: dict[str, float] = field(default_factory=dict)


@dataclass
class Ledger:
    """Control-side state that survives rollbacks (but is saved in checkpoints for resumes)."""

    lr_scale: float = 1.0
    skip_ranges: list[list[int]] = field(default_factory=list)  # [start, end) global sample cursors


class Trainer:
    """One training job.

    Thread-safe entry points: `submit` (alerts, commands, actions), and `request_checkpoint` /
    `request_stop`, which only set a flag and so are also safe inside a signal handler.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: BatchSource,
        out_dir: str | Path,
        *,
        val_data: BatchSource | None = None,
        callbacks: list[Callback] = (),
        baseline_histogram: np.ndarray | None = None,
        policy: ControlPolicy | None = None,
        dist: DistContext | None = None,
        run_id: str | None = None,
    ) -> None:
        self.config = config
        self.data, self.val_data = data, val_data
        self.out_dir = Path(out_dir)
        self.ctx = dist or init_distributed(config.distributed, config.device)
        self.device = self.ctx.device
        self.precision = Precision(resolve_precision(config.precision, self.device), self.device)
        self.model_config = config.model_config_resolved()
        self.run_id = run_id

        seed_everything(config.seed)
        raw = Llama(self.model_config).to(self.device)
        if config.compile:
            for block in raw.layers:
                block.compile()
        self.raw_model: Llama = raw
        self.model: nn.Module = wrap_model(raw, self.ctx, config.distributed)
        self.optimizer = build_optimizer(self.model, config.optim, self.ctx)
        self.schedule = LRSchedule(config.optim, config.max_steps)

        self.curriculum = Curriculum(config.batch, config.curriculum, world_size=self.ctx.world_size,
                                     micro_batch=self._micro_batch_size())
        named = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
        self.guard = StabilityGuard(config.stability, GradNorms(named, sharded=self.ctx.strategy == "fsdp"))
        ns = config.curriculum.noise_scale
        self.noise = NoiseScale(ns) if ns.enabled and self.ctx.strategy != "fsdp" else None
        self.mixer = OnlineDomainMixer(data.domains, config.mixing) if config.mixing.enabled else None
        if self.mixer is not None:
            data.set_weights(self.mixer.as_dict())
        self.faults = FaultInjector(config.faults)
        self._fault_lr_scale = 1.0
        self.policy = policy or ControlPolicy(config.control)
        self.ledger = Ledger()
        self.state = TrainState()
        self.checkpointer = TrainCheckpointer(self.out_dir / config.checkpoint.dirname, config.checkpoint, self.ctx)

        cbs: list[Callback] = []
        if config.probes.enabled:
            cbs += default_probes(self.model_config.vocab_size, rare_token_quantile=config.probes.rare_token_quantile,
                                  baseline=baseline_histogram)
        if self.ctx.is_main:
            if config.log.structlog:
                cbs.append(StructlogEmitter())
            if config.log.wandb.mode != "disabled":
                cbs.append(WandbEmitter(config.log.wandb, self.out_dir, config.model_dump(mode="json"), run_id))
        self.hooks = Hooks([*cbs, *callbacks])

        self.peak_flops = config.peak_flops or device_peak_flops(self.device, self.precision.mode)
        self._inbox: queue.Queue[Alert | Command | Action] = queue.Queue()
        self._requested_checkpoint: tuple[str, str] | None = None  # set by signal handlers: no locks
        self._requested_stop: tuple[str, str] | None = None
        self._stop_checkpoint_reason = "command"
        self._paused = False
        self._stop: tuple[Status, str] | None = None
        self._val_initial = val_data.state_dict() if val_data is not None else None
        self._cursor_history: dict[int, tuple[int, int]] = {}  # step -> global sample cursors, recent steps
        self._pre_rollback_cursor: int | None = None
        self._applied_plan: tuple[int, int] | None = None
        self._throughput = Throughput()
        self._interval: list[StepResult] = []
        self._checkpoints_written: list[CheckpointInfo] = []
        self._last_ckpt_step: int | None = None
        self._resumed_from: int | None = None
        self.losses: dict[int, float] = {}

    # --- thread-safe entry points -------------------------------------------------------------

    def submit(self, item: Alert | Command | Action) -> None:
        """Queue an alert, a command or a ready action; applied between steps (rank 0's queue rules)."""
        if not isinstance(item, (Alert, Command, Action)):
            raise ControlError(f"submit takes an Alert, a Command or an Action, not {type(item).__name__}")
        self._inbox.put(item)

    def request_checkpoint(self, reason: str = "signal", *, kind: str = "signal") -> None:
        """Checkpoint between steps. kind is the checkpoint's reason in events: 'signal' or 'command'."""
        self._requested_checkpoint = (reason, kind)

    def request_stop(self, reason: str = "signal", *, kind: str = "signal") -> None:
        """Checkpoint, then stop (what SIGTERM should do); the result carries `reason`."""
        self._requested_stop = (reason, kind)

    # --- setup helpers --------------------------------------------------------------------

    def _micro_batch_size(self) -> int:
        per_rank = self.config.batch.global_batch_size // self.ctx.world_size
        mb = self.config.batch.micro_batch_size
        if mb != "auto":
            return mb
        if self.device.type != "cuda":
            return max(1, min(per_rank, 8))
        T, V = self.config.batch.seq_len, self.model_config.vocab_size

        def trial(size: int) -> None:
            ids = torch.randint(0, V, (size, T), device=self.device)
            with self.precision.autocast():
                logits = self.raw_model(ids)
            F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
            self.raw_model.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)

        size = find_micro_batch_size(trial, per_rank, empty_cache=torch.cuda.empty_cache)
        if self.ctx.active:  # every rank uses the smallest that fits anywhere
            t = torch.tensor([-size], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            size = -int(t.item())
        log.info("trainer.micro_batch", micro_batch_size=size, per_rank_batch=per_rank)
        return size

    # --- the loop -------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None, *, expected_digest: str | None = None) -> TrainingResult:
        """Train to `max_steps` (or until stopped/halted); resume: None, 'latest' or a checkpoint path."""
        try:
            self.start(resume, expected_digest=expected_digest)
            while self.step() is not None:
                pass
            return self.finish()
        finally:
            self.close()

    def start(self, resume: str | Path | None = None, *, expected_digest: str | None = None) -> None:
        """Restore (when resuming) and fire `train_start`; `fit` = start + step until None + finish."""
        self._t0 = time.perf_counter()
        if resume is not None:
            path = self.checkpointer.resolve(resume)
            self._restore(self.checkpointer.load(path, expected_digest=expected_digest), keep_ledger=False)
            self._resumed_from = self.state.step
            self._last_ckpt_step = self.state.step
        elif self.config.checkpoint.at_start:
            self._save("rollback-point")
        self.hooks.fire(Event.TRAIN_START, self, resumed_from=self._resumed_from)
        self._throughput = Throughput()

    def step(self) -> StepResult | None:
        """Apply pending control, then run one step with its hooks; None once the run is over."""
        if self._stop is None:
            self._apply_control()
        if self._stop is None and self.state.step >= self.config.max_steps:
            self._stop = ("completed", f"reached max_steps={self.config.max_steps}")
        if self._stop is not None:
            return None
        result = self.train_step()
        self._after_step(result)
        return result

    def finish(self) -> TrainingResult:
        """Final checkpoint (unless halted), wait for writes, fire `train_end`; returns the result."""
        status, reason = self._stop or ("stopped", "finished before max_steps")
        if status != "halted" and self._last_ckpt_step != self.state.step:
            self._save("final" if status == "completed" else self._stop_checkpoint_reason)
        self.checkpointer.wait()
        self._poll_checkpoints()
        result = self._result(status, reason, time.perf_counter() - self._t0)
        self.hooks.fire(Event.TRAIN_END, self, result=result)
        return result

    def close(self) -> None:
        """Stop the checkpoint writer and close emitters (idempotent)."""
        self.checkpointer.close()
        self.hooks.close()

    def train_step(self) -> StepResult:
        """One optimizer step (collective under torchrun)."""
        step = self.state.step + 1
        t_step = time.perf_counter()
        plan = self.curriculum.plan(step)
        self._apply_plan(plan)
        if (factor := self.faults.lr_factor(step)) is not None:
            # Kept apart from the ledger: the fault is damage that a rollback undoes, whereas
            # the ledger (operator and policy LR cuts) survives rollbacks.
            self._fault_lr_scale *= factor
            log.warning("trainer.fault", fault="lr_multiply", step=step, factor=factor)
        if (name := self.faults.poison(self.raw_model, step)) is not None:
            log.warning("trainer.fault", fault="nan_param", step=step, parameter=name)
        lr = self.schedule(step) * plan.lr_scale * self.ledger.lr_scale * self._fault_lr_scale
        set_lr(self.optimizer, lr)

        c0 = self.data.cursor
        batches = []
        for _ in range(plan.accum):
            self._skip_bad_ranges()
            batch = next(self.data)
            self.hooks.fire(Event.BATCH, self, batch=batch, step=step)
            batches.append(batch)
        self._cursor_history[step] = (c0, self.data.cursor)
        if len(self._cursor_history) > 2 * _HISTORY:  # alerts name recent windows; forget the distant past
            self._cursor_history = {s: c for s, c in self._cursor_history.items() if s > step - _HISTORY}
        if (corrupted := self.faults.corrupt_batches(batches, step, self.model_config.vocab_size)) is not None:
            log.warning("trainer.fault", fault="corrupt_batch", step=step)
            batches = corrupted

        masks = [b["loss_mask"].float() if "loss_mask" in b else torch.ones(b["labels"].shape) for b in batches]
        n_local = sum(float(m.sum()) for m in masks)
        n_tok = float(self.ctx.all_reduce_sum(torch.tensor([n_local], dtype=torch.float64, device=self.device)).item())
        if n_tok == 0:
            raise TrainingError(f"step {step}: every token of the batch is masked out (loss_mask all zero); check the data")
        K = len(self.data.domains)
        stats = torch.zeros(1 + 2 * K, dtype=torch.float64, device=self.device)  # loss sum, domain sums, domain counts
        g_small_sq = None
        world = self.ctx.world_size
        for i, (batch, mask) in enumerate(zip(batches, masks, strict=True)):
            last = i == len(batches) - 1
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            with self._sync_context(last):
                with self.precision.autocast():
                    logits = self.model(ids)  # [B, T, V]
                logits = logits.float()
                tok_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
                masked = tok_loss * mask  # [B, T]
                objective = masked.sum()
                if self.config.stability.z_loss:
                    z = torch.logsumexp(logits, dim=-1)  # [B, T]
                    objective = objective + self.config.stability.z_loss * (z.square() * mask).sum()
                # Normalised by the step's token count over all ranks; DDP/FSDP average gradients over ranks.
                loss = objective * (world / n_tok)
                self.precision.scale(loss).backward()
            with torch.no_grad():
                stats[0] += masked.sum().double()
                if "domain" in batch and K > 1:
                    dom = batch["domain"].to(self.device)
                    stats[1:1 + K].index_add_(0, dom, masked.sum(-1).double())
                    stats[1 + K:].index_add_(0, dom, mask.sum(-1).double())
            if self.noise is not None and i == 0 and len(batches) > 1:
                g_small_sq = self._micro_grad_sq(float(mask.sum()), n_tok)
        self.ctx.all_reduce_sum(stats)
        loss_value = float(stats[0]) / n_tok

        self.precision.unscale_(self.optimizer)
        verdict = self.guard.check_and_clip(loss_value)
        if verdict.applied:
            self.precision.step(self.optimizer)
        self.precision.update()
        self.optimizer.zero_grad(set_to_none=True)

        if self.noise is not None and g_small_sq is not None and verdict.applied:
            # Per-sequence units: B_small = one micro-batch on one rank, B_big = the global batch.
            self.noise.update(g_small_sq, plan.micro_batch, verdict.grad_norm ** 2, plan.global_batch)
        domain_loss = {}
        if K > 1:
            sums, counts = stats[1:1 + K].tolist(), stats[1 + K:].tolist()
            domain_loss = {d: s / c for d, s, c in zip(self.data.domains, sums, counts, strict=True) if c > 0}
            if self.mixer is not None:
                self.mixer.observe(dict(zip(self.data.domains, sums, strict=True)),
                                   dict(zip(self.data.domains, counts, strict=True)))
        tokens = plan.global_batch * plan.seq_len
        self.state.step = step
        self.state.tokens += tokens
        self.state.last_loss = loss_value
        self.losses[step] = loss_value
        if len(self.losses) > 2 * _HISTORY:
            self.losses = {s: v for s, v in self.losses.items() if s > step - _HISTORY}
        self._last_batch = batches[-1]
        first = "slowdown" not in self.faults.fired
        if (slow := self.faults.slowdown(step)) > 1.0:
            if first:
                log.warning("trainer.fault", fault="slowdown", step=step, factor=slow)
            time.sleep((slow - 1.0) * (time.perf_counter() - t_step))
        return StepResult(step, loss_value, verdict.applied, verdict.grad_norm, verdict.per_layer, lr, tokens,
                          plan.seq_len, plan.global_batch, verdict.clip_coef, domain_loss, verdict.reason)

    def _after_step(self, r: StepResult) -> None:
        cfg = self.config
        step = r.step
        self._throughput.add(r.tokens)
        self._interval.append(r)
        if not r.applied:
            log.warning("trainer.step_skipped", step=step, reason=r.skip_reason, skipped_steps=self.guard.skipped_steps)
        self.hooks.fire(Event.STEP_END, self, result=r)
        if self.guard.consecutive_skips >= cfg.stability.max_consecutive_skips:
            # The loop's own alarm, decided by the same policy as the health monitor's alerts.
            n = self.guard.consecutive_skips
            self.guard.consecutive_skips = 0
            if self.ctx.is_main:  # rank 0's inbox is broadcast to the others
                self.submit(Alert("non_finite", "critical", step - n + 1, step, "rollback_cut_lr",
                                  f"{n} consecutive non-finite steps (loop)"))
        if self.mixer is not None and step % cfg.mixing.update_every == 0:
            self.data.set_weights(self.mixer.update())
        if self.noise is not None and self.noise.should_grow(step, r.global_batch):
            new = self.curriculum.grow(step, 2, cfg.curriculum.noise_scale.max_global_batch_size)
            if new is not None:
                self.noise.last_growth_step = step
                log.info("trainer.batch_grow", step=step, global_batch=new, noise_scale=self.noise.value)
        if cfg.probes.enabled and step % cfg.probes.every == 0:
            self._probe(step)
        if cfg.eval.every and self.val_data is not None and step % cfg.eval.every == 0:
            self.evaluate()
        if step % cfg.log.every == 0 or step == cfg.max_steps:
            self._log(step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            if r.applied:
                self._save("interval")
            else:  # a non-finite step: the state may be poisoned, and a rollback target must be good
                log.warning("trainer.checkpoint_skipped", step=step, reason=r.skip_reason)
        self._poll_checkpoints()

    # --- pieces of a step -----------------------------------------------------------------

    def _apply_plan(self, plan: StepPlan) -> None:
        key = (plan.seq_len, plan.micro_batch)
        if key != self._applied_plan:
            self.data.set_seq_len(plan.seq_len)
            self.data.set_batch_size(plan.micro_batch)
            self._applied_plan = key

    def _sync_context(self, last: bool):
        """Gradient sync only on the last micro-batch of a step."""
        if self.ctx.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.ctx.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _micro_grad_sq(self, n_micro: float, n_tok: float) -> float:
        """|g_small|^2 of the first micro-batch (this rank, before any sync), in mean-gradient units."""
        total, _ = self.guard.norms.compute()
        total /= self.precision.loss_scale or 1.0  # fp16: gradients are still scaled here
        scale = n_tok / (self.ctx.world_size * max(n_micro, 1.0))
        return (total * scale) ** 2

    def _skip_bad_ranges(self) -> None:
        for start, end in self.ledger.skip_ranges:
            if start <= self.data.cursor < end:
                self.data.skip(end - self.data.cursor)

    def _probe(self, step: int) -> None:
        n = self.config.probes.batch_size
        batch = {k: v[:n].to(self.device) for k, v in self._last_batch.items()}
        ctx = ProbeContext(self.raw_model, batch, step, self.data.domains, self.config.probes.dead_unit_ratio,
                           self.precision.autocast)
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            stance = torch.compiler.set_stance("force_eager") if self.config.compile else contextlib.nullcontext()
            with stance, torch.no_grad():
                self.hooks.fire(Event.PROBE, self, ctx=ctx)
        finally:
            self.raw_model.train(was_training)
        self.state.probe_values.update(ctx.values)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean masked loss over `eval.batches` validation micro-batches (the same ones every time)."""
        if self.val_data is None:
            raise TrainingError("evaluate() needs a val_data batch source")
        self._throughput.pause()
        self.val_data.load_state_dict(self._val_initial)
        self.raw_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for _ in range(self.config.eval.batches):
                b = next(self.val_data)
                ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
                mask = (b["loss_mask"].float().to(self.device) if "loss_mask" in b
                        else torch.ones_like(labels, dtype=torch.float32))
                with self.precision.autocast():
                    logits = self.raw_model(ids)  # FSDP2 shards in place: its hooks still gather the weights
                tok = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
                total[0] += (tok * mask).sum().double()
                total[1] += mask.sum().double()
        finally:
            self.raw_model.train()
            self._throughput.resume()
        self.ctx.all_reduce_sum(total)
        val = float(total[0] / total[1].clamp_min(1))
        self.state.last_val_loss, self.state.last_val_step = val, self.state.step
        if math.isfinite(val) and (self.state.best_val_loss is None or val < self.state.best_val_loss):
            self.state.best_val_loss = val
        self.hooks.fire(Event.EVAL, self, val_loss=val, step=self.state.step)
        return val

    def _log(self, step: int) -> None:
        rate = self._throughput.rate()
        interval, self._interval = self._interval, []
        if not self.ctx.is_main or not interval:
            return
        r = interval[-1]
        domain_loss: dict[str, list[float]] = {}
        for x in interval:
            for d, v in x.domain_loss.items():
                domain_loss.setdefault(d, []).append(v)
        metrics: dict[str, Any] = {
            "step": step,
            "tokens_seen": self.state.tokens,
            "loss": r.loss,
            "loss_avg": sum(x.loss for x in interval) / len(interval),
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "grad_norm_per_layer": dict(r.grad_norm_per_layer),
            "clip_coef": r.clip_coef,
            "loss_scale": self.precision.loss_scale,
            "skipped_steps": self.guard.skipped_steps,
            "tokens_per_s": rate,
            "mfu": finite_or_none(mfu(rate, self.model_config.flops_per_token(r.seq_len), self.peak_flops,
                                      self.ctx.world_size)),
            "seq_len": r.seq_len,
            "batch_size": r.global_batch,
            "probes": dict(self.state.probe_values),
            "domain_loss": {d: sum(v) / len(v) for d, v in domain_loss.items()},
            "val_loss": self.state.last_val_loss if self.state.last_val_step is not None
            and self.state.last_val_step > step - self.config.log.every else None,
            "data_cursor": self.data.cursor,
            "lr_scale": self.ledger.lr_scale,
        }
        if self.noise is not None:
            metrics["noise_scale"] = self.noise.value
        if self.mixer is not None:
            metrics["domain_weights"] = self.mixer.as_dict()
        self.hooks.fire(Event.LOG, self, metrics=metrics)

    # --- checkpoints ----------------------------------------------------------------------

    def _training_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": self.state.step,
            "tokens": self.state.tokens,
            "last_loss": self.state.last_loss,
            "last_val_loss": self.state.last_val_loss,
            "last_val_step": self.state.last_val_step,
            "best_val_loss": self.state.best_val_loss,
            "model_config": self.model_config.model_dump(mode="json"),
            "train_config": self.config.model_dump(mode="json"),
            "dataset_version": self.config.dataset_version,
            "world_size": self.ctx.world_size,
            "scheduler": {"kind": "warmup_cosine", "step": self.state.step},  # a pure function of the step
            "precision": self.precision.state_dict(),
            "data": self.data.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "stability": self.guard.state_dict(),
            "noise_scale": self.noise.state_dict() if self.noise is not None else None,
            "mixing": self.mixer.state_dict() if self.mixer is not None else None,
            "callbacks": self.hooks.state_dict(),
            "ledger": {
                "lr_scale": self.ledger.lr_scale,
                "skip_ranges": self.ledger.skip_ranges,
                "policy": self.policy.state_dict(),
                "faults": self.faults.state_dict(),
            },
        }

    def _save(self, reason: str) -> Future | None:
        """Collect and snapshot (all ranks); rank 0 queues the write. The stall counts in tokens/s."""
        metric = self.state.last_val_loss
        last = self.state.last_loss
        finite = last is None or math.isfinite(last)
        meta = {"reason": reason, "tokens": self.state.tokens, "train_loss": last if finite else None,
                "finite": finite,  # manifest.json stays strict JSON (no NaN)
                "val_loss": finite_or_none(metric), "val_step": self.state.last_val_step,
                "dataset_version": self.config.dataset_version, "run_id": self.run_id}
        fut = self.checkpointer.save(self.state.step, self.model, self.optimizer, self._training_state(),
                                     metric=metric, meta=meta)
        self._last_ckpt_step = self.state.step
        return fut

    def _poll_checkpoints(self) -> None:
        writer = self.checkpointer.writer
        if writer is None:
            return
        for fut in writer.done():
            info: CheckpointInfo = fut.result()  # a failed write raises here, in the loop
            self._checkpoints_written.append(info)
            self.hooks.fire(Event.CHECKPOINT, self, info=info, reason=info.meta.get("reason", "interval"))

    def _restore(self, ckpt: Checkpoint, *, keep_ledger: bool) -> None:
        s = ckpt.state
        if s.get("format") != STATE_FORMAT:
            raise TrainingError(f"{ckpt.path} has trainer state format {s.get('format')}, expected {STATE_FORMAT}")
        if s["model_config"] != self.model_config.model_dump(mode="json"):
            raise TrainingError(f"{ckpt.path} holds a different model ({s['model_config']}); resume with the same model config")
        self.checkpointer.restore(ckpt, self.model, self.optimizer)
        self.precision.load_state_dict(s["precision"])
        self.data.load_state_dict(s["data"])
        self.curriculum.load_state_dict(s["curriculum"])
        self.guard.load_state_dict(s["stability"])
        if self.noise is not None and s.get("noise_scale"):
            self.noise.load_state_dict(s["noise_scale"])
        if self.mixer is not None and s.get("mixing"):
            self.mixer.load_state_dict(s["mixing"])
        self.hooks.load_state_dict(s.get("callbacks", {}))
        self.state.step, self.state.tokens = int(s["step"]), int(s["tokens"])
        self.state.last_loss, self.state.best_val_loss = s.get("last_loss"), s.get("best_val_loss")
        self.state.last_val_loss, self.state.last_val_step = s.get("last_val_loss"), s.get("last_val_step")
        if not keep_ledger:
            led = s.get("ledger", {})
            self.ledger = Ledger(float(led.get("lr_scale", 1.0)), [list(r) for r in led.get("skip_ranges", [])])
            self.policy.load_state_dict(led.get("policy", {}))
            self.faults.load_state_dict(led.get("faults", {}))
        self._applied_plan = None
        self.optimizer.zero_grad(set_to_none=True)
        if s.get("dataset_version") != self.config.dataset_version:
            log.warning("trainer.dataset_version_changed", checkpoint=s.get("dataset_version"),
                        config=self.config.dataset_version)

    # --- control ----------------------------------------------------------------------------

    def _drain_inbox(self) -> list[Alert | Command | Action]:
        items: list[Alert | Command | Action] = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if (req := self._requested_checkpoint) is not None:
            self._requested_checkpoint = None
            items.append(Action(ActionKind.CHECKPOINT, req[0], {"checkpoint_reason": req[1]}))
        if (req := self._requested_stop) is not None:
            self._requested_stop = None
            items.append(Action(ActionKind.STOP, req[0], {"checkpoint_reason": req[1]}))
        if self.ctx.active:
            items = self.ctx.broadcast_objects(items)  # rank 0 decides for everyone
        return items

    def _apply_control(self) -> None:
        while True:
            for item in self._drain_inbox():
                try:
                    actions = [item] if isinstance(item, Action) else self.policy.decide(item, self.state.step)
                except ControlError as exc:  # a malformed command must not end the run: refuse it, on record
                    log.error("trainer.control_refused", item=repr(item), error=str(exc))
                    actions = [Action(ActionKind.RECORD, f"refused: {exc}", {},
                                      getattr(item, "event_id", None) if isinstance(item, Alert) else None,
                                      getattr(item, "event_id", None) if isinstance(item, Command) else None)]
                for action in actions:
                    self._apply_action(action)
                    if self._stop is not None:
                        return
            if not self._paused:
                return
            time.sleep(0.2)

    def _announce(self, action: Action, **details: Any) -> None:
        if details:
            action = Action(action.kind, action.reason, {**action.params, **details}, action.alert_event_id,
                            action.command_event_id)
        log.info("trainer.action", action=action.kind.value, why=action.reason, step=self.state.step,
                 details=action.params)
        if self.ctx.is_main:
            self.hooks.fire(Event.ACTION, self, action=action)

    def _apply_action(self, action: Action) -> None:
        k = action.kind
        if k is ActionKind.ROLLBACK:
            self._rollback(action)
        elif k is ActionKind.SKIP_DATA:
            self._skip_data(action)
        elif k is ActionKind.SCALE_LR:
            self.ledger.lr_scale *= float(action.params["factor"])
            self._announce(action, lr_scale=self.ledger.lr_scale)
        elif k is ActionKind.PAUSE:
            self._paused = True
            self._throughput.pause()
            self._announce(action)
        elif k is ActionKind.RESUME:
            if self._paused:
                self._throughput.resume()
            self._paused = False
            self._announce(action)
        elif k is ActionKind.CHECKPOINT:
            self._save(action.params.get("checkpoint_reason", "command"))
            self._announce(action)
        elif k is ActionKind.STOP:
            self._stop = ("stopped", action.reason)
            self._stop_checkpoint_reason = action.params.get("checkpoint_reason", "command")
            self._announce(action)
        elif k is ActionKind.HALT:
            self._stop = ("halted", action.reason)
            self._announce(action)
        else:
            self._announce(action)

    def _rollback(self, action: Action) -> None:
        before = action.params.get("before_step")
        self.checkpointer.wait()
        self._poll_checkpoints()
        root = self.checkpointer.root
        path = latest_valid_checkpoint(root, before_step=before) if self.ctx.is_main else None
        path = self.ctx.broadcast_objects([path])[0]
        if path is None:
            where = f" before step {before}" if before is not None else ""
            self._stop = ("halted", f"{action.reason}; no valid checkpoint{where} to roll back to")
            self._announce(Action(ActionKind.HALT, self._stop[1], {}, action.alert_event_id, action.command_event_id))
            return
        from_step, self._pre_rollback_cursor = self.state.step, self.data.cursor
        self._restore(self.checkpointer.load(path), keep_ledger=True)
        self._fault_lr_scale = 1.0
        if self.ctx.is_main:
            remove_checkpoints_after(root, self.state.step)  # the abandoned timeline
        self.losses = {s: v for s, v in self.losses.items() if s <= self.state.step}
        self._last_ckpt_step = self.state.step
        self._announce(action, from_step=from_step, restored_step=self.state.step, checkpoint=str(path))

    def _skip_data(self, action: Action) -> None:
        p = action.params
        if "samples" in p:  # ahead of the current position
            start, end = self.data.cursor, self.data.cursor + int(p["samples"])
        else:
            window = [self._cursor_history[s] for s in range(int(p["step_start"]), int(p["step_end"]) + 1)
                      if s in self._cursor_history]
            if window:
                start, end = min(w[0] for w in window), max(w[1] for w in window)
            else:  # steps not seen by this process (resumed since): skip what the rollback rewound
                start, end = self.data.cursor, self._pre_rollback_cursor or self.data.cursor
        if end > start:
            self.ledger.skip_ranges.append([start, end])
        self._announce(action, cursor_start=start, cursor_end=end)

    # --- result ---------------------------------------------------------------------------

    def _result(self, status: Status, reason: str, wall: float) -> TrainingResult:
        infos = list_checkpoints(self.checkpointer.root)
        written = [i for i in self._checkpoints_written if i.path.exists()]
        last = written[-1] if written else (infos[-1] if infos else None)
        best = None
        scored = [i for i in infos if i.metric is not None]
        if scored:
            best = min(scored, key=lambda i: i.metric).path
        return TrainingResult(
            status=status,
            final_step=self.state.step,
            tokens=self.state.tokens,
            final_loss=self.state.last_loss,
            best_val_loss=self.state.best_val_loss,
            last_checkpoint=last.path if last else None,
            last_checkpoint_digest=last.digest if last else None,
            best_checkpoint=best,
            checkpoints=[i.path for i in infos],
            skipped_steps=self.guard.skipped_steps,
            rollbacks=self.policy.rollbacks,
            wall_time_s=wall,
            reason=reason,
            losses=dict(self.losses),
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_training(
    config: TrainConfig,
    data: BatchSource,
    out_dir: str | Path,
    *,
    val_data: BatchSource | None = None,
    callbacks: list[Callback] = (),
    resume: str | Path | None = None,
    **kwargs: Any,
) -> TrainingResult:
    """Build a Trainer and run it: the one call for the service and the CLI."""
    trainer = Trainer(config, data, out_dir, val_data=val_data, callbacks=callbacks, **kwargs)
    try:
        return trainer.fit(resume=resume)
    finally:
        trainer.ctx.shutdown()


__all__ = [
    "CheckpointNotFoundError",
    "StepResult",
    "Trainer",
    "TrainingError",
    "TrainingResult",
    "run_training",
]
