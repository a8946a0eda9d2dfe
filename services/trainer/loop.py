"""The training loop: the optimizer step, and the components it wires (each concern lives in its module).

    Trainer(config, data, out_dir, ...).fit(resume=None | "latest" | path) -> TrainingResult
    run_training(config, data, out_dir, ...)                                  (the same, one call)

`step()`: the controller applies what arrived (controller.py), then `train_step()`: plan
(curriculum) -> learning rate (lr.py) -> fetch micro-batches -> forward/backward under autocast
-> unscale -> global/per-layer grad norms -> refuse non-finite steps or clip (stability.py) ->
optimizer step. Then the `step_end` hooks, and the components that keep their own cadence:
probes (probes.py), evaluation (evaluation.py), metrics, checkpoints (checkpointing.py).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.allocator import keep_freed_memory
from shared.checkpoint import Checkpoint, CheckpointNotFoundError, list_checkpoints
from shared.data.manifest import MASK_BASE, MASK_CONTEXT
from shared.logging import get_logger
from shared.model import Llama
from shared.model.loss import linear_cross_entropy

from .batching import NoiseScale, auto_micro_batch_size
from .checkpointing import TrainCheckpointer
from .config import TrainConfig
from .control import Action, ActionKind, Alert, Command, ControlPolicy
from .controller import Controller, Ledger, Status
from .curriculum import Curriculum, StepPlan
from .data import BatchSource
from .distributed import DistContext, init_distributed, wrap_model
from .evaluation import Evaluator
from .faults import FaultInjector
from .hooks import Callback, Event, Hooks
from .lr import LRFactors, LRPolicy
from .metrics import StructlogEmitter, Throughput, WandbEmitter, device_peak_flops, finite_or_none, mfu
from .mixing import OnlineDomainMixer
from .optim import LRSchedule, build_optimizer, set_lr
from .precision import Precision, resolve_precision
from .probes import ProbeRunner, default_probes
from .stability import GradNorms, StabilityGuard, StepVerdict

log = get_logger("helox.trainer")

STATE_FORMAT = 1
_HISTORY = 50_000  # steps of per-step loss history kept in memory


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
    lr_factors: LRFactors | None = None


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
    skipped_checkpoints: list[Path] = field(default_factory=list)  # corrupt ones a resume passed over


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    last_loss: float | None = None
    last_val_loss: float | None = None
    last_val_step: int | None = None
    best_val_loss: float | None = None
    probe_values: dict[str, float] = field(default_factory=dict)


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

        if self.device.type == "cpu":
            keep_freed_memory()  # glibc: no fresh pages for every step's tensors (shared/allocator.py)
        seed_everything(config.seed)
        raw = Llama(self.model_config).to(self.device)
        if config.compile:
            for block in raw.layers:
                block.compile()
        self.raw_model: Llama = raw
        self.model: nn.Module = wrap_model(raw, self.ctx, config.distributed)
        # Head and loss in one blocked pass (shared.model.loss) on one process in fp32: DDP must see
        # its module's forward, FSDP2 (in place: `self.model is raw`) shards the head's weight, and
        # autocast wants the logits made under it.
        self._fused_head = (config.fused_loss and self.ctx.strategy == "none" and self.precision.mode == "fp32"
                            and type(raw.lm_head) is nn.Linear)
        self.optimizer = build_optimizer(raw, config.optim, self.ctx.device, zero=self.ctx.zero)

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
        self.controller = Controller(self, policy or ControlPolicy(config.control))
        self.lr = LRPolicy(LRSchedule(config.optim, config.max_steps), self.faults, self.controller.ledger)
        self.state = TrainState()
        self.checkpointer = TrainCheckpointer(self.out_dir / config.checkpoint.dirname, config.checkpoint, self.ctx,
                                              self.model, self.optimizer, self._checkpoint_state)

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
        self.prober = ProbeRunner(config.probes, raw, data.domains, self.hooks, self, device=self.device,
                                  autocast=self.precision.autocast, compiled=config.compile)
        self.evaluator = Evaluator(config.eval, val_data, raw, self.ctx, autocast=self.precision.autocast)

        self.peak_flops = config.peak_flops or device_peak_flops(self.device, self.precision.mode)
        self.throughput = Throughput()
        self._interval: list[StepResult] = []
        self._rag: torch.Tensor | None = None  # RAG-packed data, last step: base loss sum, base labels, retrieved, all
        self._drawn_tokens = 0  # the last step's tokens, summed over ranks
        self._sample_ranges: list[tuple[int, int]] = []  # the last step's global samples [start, end) on this rank
        self._advanced = 0  # how far the last step moved the global cursor (reads only, not skips)
        self._applied_plan: tuple[int, int] | None = None
        self._last_batch: dict[str, torch.Tensor] = {}
        self._resumed_from: int | None = None
        self.losses: dict[int, float] = {}

    @property
    def policy(self) -> ControlPolicy:
        return self.controller.policy

    @property
    def ledger(self) -> Ledger:
        return self.controller.ledger

    # --- thread-safe entry points -------------------------------------------------------------

    def submit(self, item: Alert | Command | Action) -> None:
        """Queue an alert, a command or a ready action; applied between steps (rank 0's queue rules)."""
        self.controller.submit(item)

    def request_checkpoint(self, reason: str = "signal", *, kind: str = "signal") -> None:
        """Checkpoint between steps. kind is the checkpoint's reason in events: 'signal' or 'command'."""
        self.controller.request_checkpoint(reason, kind=kind)

    def request_stop(self, reason: str = "signal", *, kind: str = "signal") -> None:
        """Checkpoint, then stop (what SIGTERM should do); the result carries `reason`."""
        self.controller.request_stop(reason, kind=kind)

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
        path = None
        if resume is not None:
            path = self.checkpointer.resolve(resume)
            self._restore(self.checkpointer.load(path, expected_digest=expected_digest), keep_ledger=False)
            self._resumed_from = self.state.step
        else:
            self.checkpointer.maybe_save_initial()
        self.hooks.fire(Event.TRAIN_START, self, resumed_from=self._resumed_from)
        for corrupt in self.checkpointer.skipped:  # on the audit trail, not only in a log line
            self.controller.announce(Action(
                ActionKind.RECORD, f"resume passed over the corrupt checkpoint {corrupt.path} ({corrupt.file}: "
                f"{corrupt.reason}) and resumed from {path}",
                {"corrupt_checkpoint": str(corrupt.path), "corrupt_file": corrupt.file, "resumed_from": str(path)}))
        self.throughput = Throughput()

    def step(self) -> StepResult | None:
        """Apply pending control, then run one step with its hooks; None once the run is over."""
        control = self.controller
        if control.stop is None:
            control.apply()
        if control.stop is None and self.state.step >= self.config.max_steps:
            control.stop = ("completed", f"reached max_steps={self.config.max_steps}")
        if control.stop is not None:
            return None
        result = self.train_step()
        self._after_step(result)
        return result

    def finish(self) -> TrainingResult:
        """Final checkpoint (unless halted), wait for writes, fire `train_end`; returns the result."""
        status, reason = self.controller.stop or ("stopped", "finished before max_steps")
        if status != "halted" and self.checkpointer.last_step != self.state.step:
            why = "final" if status == "completed" else self.controller.stop_checkpoint_reason
            self.checkpointer.save(self.state.step, why)
        self.settle_checkpoints()
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
        lr = self.lr.at(step, plan)
        set_lr(self.optimizer, lr.lr)
        if (name := self.faults.poison(self.raw_model, step)) is not None:
            log.warning("trainer.fault", fault="nan_param", step=step, parameter=name)

        batches = self._fetch(step, plan.accum)
        stats, n_tok, g_small_sq = self._forward_backward(step, batches)
        loss_value = float(stats[0]) / n_tok
        verdict = self._apply_gradients(loss_value)

        if self.noise is not None and g_small_sq is not None and verdict.applied:
            # Per-sequence units: B_small = one micro-batch on one rank, B_big = the global batch.
            self.noise.update(g_small_sq, plan.micro_batch, verdict.grad_norm ** 2, plan.global_batch)
        domain_loss = self._domain_loss(stats)
        tokens = self._drawn_tokens  # read from the data, all ranks: a duplicated slice would show here
        self.state.step = step
        self.state.tokens += tokens
        self.state.last_loss = loss_value
        self.losses[step] = loss_value
        if len(self.losses) > 2 * _HISTORY:
            self.losses = {s: v for s, v in self.losses.items() if s > step - _HISTORY}
        self._last_batch = batches[-1]
        self._injected_slowdown(step, t_step)
        return StepResult(step, loss_value, verdict.applied, verdict.grad_norm, verdict.per_layer, lr.lr, tokens,
                          plan.seq_len, plan.global_batch, verdict.clip_coef, domain_loss, verdict.reason, lr)

    def _after_step(self, r: StepResult) -> None:
        step = r.step
        self.throughput.add(r.tokens)
        self._interval.append(r)
        if not r.applied:
            log.warning("trainer.step_skipped", step=step, reason=r.skip_reason, skipped_steps=self.guard.skipped_steps)
        self.hooks.fire(Event.STEP_END, self, result=r)
        if (alert := self.guard.non_finite_alert(step)) is not None and self.ctx.is_main:
            self.submit(alert)  # rank 0's inbox is broadcast to the others
        self._adapt_data(step, r.global_batch)
        if (values := self.prober.maybe_probe(step, self._last_batch)) is not None:
            self.state.probe_values.update(values)
        if self.evaluator.due(step):
            self.evaluate()
        if step % self.config.log.every == 0 or step == self.config.max_steps:
            self._log(step)
        self.checkpointer.maybe_save(step, applied=r.applied, skip_reason=r.skip_reason)
        self._announce_checkpoints()

    # --- pieces of a step -----------------------------------------------------------------

    def _apply_plan(self, plan: StepPlan) -> None:
        key = (plan.seq_len, plan.micro_batch)
        if key != self._applied_plan:
            self.data.set_seq_len(plan.seq_len)
            self.data.set_batch_size(plan.micro_batch)
            self._applied_plan = key

    def _fetch(self, step: int, n: int) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches, past any data window the ledger skips."""
        c0 = self.data.cursor
        batches = []
        self._sample_ranges, self._advanced = [], 0
        for _ in range(n):
            self.ledger.skip(self.data)
            first = self.data.cursor
            batch = next(self.data)
            rows = int(batch["input_ids"].shape[0])
            # The BatchSource contract: rank r takes samples [cursor + r*B, cursor + (r+1)*B).
            self._sample_ranges.append((first + self.ctx.rank * rows, first + (self.ctx.rank + 1) * rows))
            self._advanced += self.data.cursor - first
            self.hooks.fire(Event.BATCH, self, batch=batch, step=step)
            batches.append(batch)
        self.controller.note_window(step, c0, self.data.cursor)
        if (corrupted := self.faults.corrupt_batches(batches, step, self.model_config.vocab_size)) is not None:
            log.warning("trainer.fault", fault="corrupt_batch", step=step)
            batches = corrupted
        return batches

    def _forward_backward(self, step: int, batches: list[dict[str, torch.Tensor]]
                          ) -> tuple[torch.Tensor, float, float | None]:
        """Gradients of the step's loss; returns (loss/domain stats, tokens counted, |g_small|^2 or None)."""
        masks = [b["loss_mask"].float() if "loss_mask" in b else torch.ones(b["labels"].shape) for b in batches]
        n_local = sum(float(m.sum()) for m in masks)
        drawn, rows = sum(b["input_ids"].numel() for b in batches), sum(b["input_ids"].shape[0] for b in batches)
        counts = self.ctx.all_reduce_sum(torch.tensor([n_local, drawn, rows], dtype=torch.float64, device=self.device))
        n_tok, self._drawn_tokens = float(counts[0]), int(counts[1])
        if self.ctx.world_size > 1 and int(counts[2]) != self._advanced:
            raise TrainingError(
                f"step {step}: the ranks read {int(counts[2])} samples but the data cursor moved {self._advanced}: "
                "they read overlapping samples; build the data source with this rank and world size "
                "(services.trainer.job.build_trainer does)")
        if n_tok == 0:
            raise TrainingError(f"step {step}: every token of the batch is masked out (loss_mask all zero); check the data")
        K = len(self.data.domains)
        stats = torch.zeros(1 + 2 * K, dtype=torch.float64, device=self.device)  # loss sum, domain sums, domain counts
        rag = torch.zeros(4, dtype=torch.float64, device=self.device) if "token_kind" in batches[0] else None
        g_small_sq = None
        world = self.ctx.world_size
        for i, (batch, mask) in enumerate(zip(batches, masks, strict=True)):
            last = i == len(batches) - 1
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            with self._sync_context(last):
                z_loss = self.config.stability.z_loss
                if self._fused_head:
                    hidden = self.model.hidden_states(ids)  # [B, T, C]
                    # The normalisation goes into the token weights, so the objective is the loss and its
                    # backward hands out the fused gradients as they are (no scaling pass over the head's).
                    loss, tok_loss, _ = linear_cross_entropy(
                        hidden.flatten(0, 1), self.raw_model.lm_head.weight, labels.flatten(),
                        mask.flatten() * (world / n_tok), z_loss=z_loss)
                    tok_loss = tok_loss.view_as(labels)
                    masked = tok_loss * mask  # [B, T]
                else:
                    with self.precision.autocast():
                        logits = self.model(ids)  # [B, T, V]
                    logits = logits.float()
                    tok_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
                    masked = tok_loss * mask  # [B, T]
                    objective = masked.sum()
                    if z_loss:
                        z = torch.logsumexp(logits, dim=-1)  # [B, T]
                        objective = objective + z_loss * (z.square() * mask).sum()
                    # Normalised by the step's token count over all ranks; DDP/FSDP average gradients over ranks.
                    loss = objective * (world / n_tok)
                self.precision.scale(loss).backward()
            with torch.no_grad():
                stats[0] += masked.sum().double()
                if rag is not None:  # base-token loss and the retrieved share, whatever the context's weight
                    kind = batch["token_kind"].to(self.device)
                    base = kind == MASK_BASE
                    rag += torch.stack([(tok_loss * base).sum().double(), base.sum().double(),
                                        (kind == MASK_CONTEXT).sum().double(), torch.tensor(kind.numel(),
                                        dtype=torch.float64, device=self.device)])
                if "domain" in batch and K > 1:
                    dom = batch["domain"].to(self.device)
                    stats[1:1 + K].index_add_(0, dom, masked.sum(-1).double())
                    stats[1 + K:].index_add_(0, dom, mask.sum(-1).double())
            if self.noise is not None and i == 0 and len(batches) > 1:
                g_small_sq = self._micro_grad_sq(float(mask.sum()), n_tok)
        self.ctx.all_reduce_sum(stats)
        if rag is not None:
            self._rag = self.ctx.all_reduce_sum(rag)
        return stats, n_tok, g_small_sq

    def _apply_gradients(self, loss_value: float) -> StepVerdict:
        """Unscale, check and clip (the guard), then step unless the guard refused."""
        self.precision.unscale_(self.optimizer)
        verdict = self.guard.check_and_clip(loss_value)
        if verdict.applied:
            self.precision.step(self.optimizer)
        self.precision.update()
        self.optimizer.zero_grad(set_to_none=True)
        return verdict

    def _domain_loss(self, stats: torch.Tensor) -> dict[str, float]:
        """Per-domain mean loss of the step (and the online mixer's observation of it)."""
        K = len(self.data.domains)
        if K <= 1:
            return {}
        sums, counts = stats[1:1 + K].tolist(), stats[1 + K:].tolist()
        if self.mixer is not None:
            self.mixer.observe(dict(zip(self.data.domains, sums, strict=True)),
                               dict(zip(self.data.domains, counts, strict=True)))
        return {d: s / c for d, s, c in zip(self.data.domains, sums, counts, strict=True) if c > 0}

    def _injected_slowdown(self, step: int, t_step: float) -> None:
        first = "slowdown" not in self.faults.fired
        if (slow := self.faults.slowdown(step)) > 1.0:
            if first:
                log.warning("trainer.fault", fault="slowdown", step=step, factor=slow)
            time.sleep((slow - 1.0) * (time.perf_counter() - t_step))

    def _adapt_data(self, step: int, global_batch: int) -> None:
        """Online domain mixing and noise-scale batch growth, each on its own cadence."""
        cfg = self.config
        if self.mixer is not None and step % cfg.mixing.update_every == 0:
            self.data.set_weights(self.mixer.update())
        if self.noise is not None and self.noise.should_grow(step, global_batch):
            new = self.curriculum.grow(step, 2, cfg.curriculum.noise_scale.max_global_batch_size)
            if new is not None:
                self.noise.last_growth_step = step
                log.info("trainer.batch_grow", step=step, global_batch=new, noise_scale=self.noise.value)

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

    def _micro_batch_size(self) -> int:
        per_rank = self.config.batch.global_batch_size // self.ctx.world_size
        mb = self.config.batch.micro_batch_size
        if mb != "auto":
            return mb

        def smallest_over_ranks(size: int) -> int:
            if not self.ctx.active:
                return size
            t = torch.tensor([-size], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return -int(t.item())

        size = auto_micro_batch_size(self.raw_model, self.precision.autocast, per_rank, self.config.batch.seq_len,
                                     self.device, all_ranks_min=smallest_over_ranks)
        log.info("trainer.micro_batch", micro_batch_size=size, per_rank_batch=per_rank)
        return size

    # --- evaluation and metrics -------------------------------------------------------------

    def evaluate(self) -> float:
        """Mean masked loss over `eval.batches` validation micro-batches (the same ones every time)."""
        if self.val_data is None:
            raise TrainingError("evaluate() needs a val_data batch source")
        self.throughput.pause()  # evaluation time is not training throughput
        try:
            val = self.evaluator.evaluate()
        finally:
            self.throughput.resume()
        self.state.last_val_loss, self.state.last_val_step = val, self.state.step
        if math.isfinite(val) and (self.state.best_val_loss is None or val < self.state.best_val_loss):
            self.state.best_val_loss = val
        self.hooks.fire(Event.EVAL, self, val_loss=val, step=self.state.step)
        return val

    def _log(self, step: int) -> None:
        rate = self.throughput.rate()
        interval, self._interval = self._interval, []
        ranges = self.ctx.all_gather_objects(self._sample_ranges)  # collective: every rank logs at the same steps
        if self.ctx.world_size > 1:
            log.info("trainer.rank_samples", step=step, rank=self.ctx.rank, samples=self._sample_ranges)
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
            **(r.lr_factors.metrics() if r.lr_factors is not None else {}),
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
            "sample_ranges": [[list(r) for r in rank] for rank in ranges],  # per rank: the last step's [start, end)
        }
        if self._rag is not None:
            base_sum, n_base, n_ctx, n_all = self._rag.tolist()
            metrics["retrieved_fraction"] = n_ctx / n_all if n_all else 0.0
            metrics["probes"]["rag.retrieved_fraction"] = metrics["retrieved_fraction"]
            if n_base:
                metrics["loss_base"] = base_sum / n_base
                # On the bus as gauges: TrainingMetrics.probes is the contract's open dict of values.
                metrics["probes"]["rag.loss_base"] = metrics["loss_base"]
        if self.noise is not None:
            metrics["noise_scale"] = self.noise.value
        if self.mixer is not None:
            metrics["domain_weights"] = self.mixer.as_dict()
        self.hooks.fire(Event.LOG, self, metrics=metrics)

    # --- checkpoints ----------------------------------------------------------------------

    def _checkpoint_state(self, reason: str) -> tuple[dict[str, Any], float | None, dict[str, Any]]:
        """What the checkpointer saves besides model, optimizer and RNG: (state, metric, meta)."""
        last = self.state.last_loss
        finite = last is None or math.isfinite(last)
        meta = {"reason": reason, "tokens": self.state.tokens, "train_loss": last if finite else None,
                "finite": finite,  # manifest.json stays strict JSON (no NaN)
                "val_loss": finite_or_none(self.state.last_val_loss), "val_step": self.state.last_val_step,
                "dataset_version": self.config.dataset_version, "run_id": self.run_id}
        state = {
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
            "lr": self.lr.state_dict(),
            "precision": self.precision.state_dict(),
            "data": self.data.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "stability": self.guard.state_dict(),
            "noise_scale": self.noise.state_dict() if self.noise is not None else None,
            "mixing": self.mixer.state_dict() if self.mixer is not None else None,
            "callbacks": self.hooks.state_dict(),
            "ledger": {**self.controller.state_dict(), "faults": self.faults.state_dict()},
        }
        return state, self.state.last_val_loss, meta

    def settle_checkpoints(self) -> None:
        """Wait for every pending write, then fire `checkpoint` for each."""
        self.checkpointer.wait()
        self._announce_checkpoints()

    def _announce_checkpoints(self) -> None:
        for info in self.checkpointer.finished():  # a failed write raises here, in the loop
            self.hooks.fire(Event.CHECKPOINT, self, info=info, reason=info.meta.get("reason", "interval"))

    def rewind(self, ckpt: Checkpoint) -> None:
        """Back to a checkpoint of this run (a rollback): the ledger stays, the injected LR fault goes."""
        self._restore(ckpt, keep_ledger=True)
        self.lr.undo_fault()
        self.losses = {s: v for s, v in self.losses.items() if s <= self.state.step}

    def _restore(self, ckpt: Checkpoint, *, keep_ledger: bool) -> None:
        s = ckpt.state
        if s.get("format") != STATE_FORMAT:
            raise TrainingError(f"{ckpt.path} has trainer state format {s.get('format')}, expected {STATE_FORMAT}")
        if s["model_config"] != self.model_config.model_dump(mode="json"):
            raise TrainingError(f"{ckpt.path} holds a different model ({s['model_config']}); resume with the same model config")
        self.checkpointer.restore(ckpt)
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
            self.controller.load_state_dict(led)
            self.faults.load_state_dict(led.get("faults", {}))
            self.lr.load_state_dict(s.get("lr", {}))
        self._applied_plan = None
        self.optimizer.zero_grad(set_to_none=True)
        if s.get("dataset_version") != self.config.dataset_version:
            log.warning("trainer.dataset_version_changed", checkpoint=s.get("dataset_version"),
                        config=self.config.dataset_version)

    # --- result ---------------------------------------------------------------------------

    def _result(self, status: Status, reason: str, wall: float) -> TrainingResult:
        infos = list_checkpoints(self.checkpointer.root)
        written = [i for i in self.checkpointer.written if i.path.exists()]
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
            skipped_checkpoints=[c.path for c in self.checkpointer.skipped],
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
