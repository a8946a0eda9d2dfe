"""Probes: model and data health measured on a sampled batch every `probes.every` steps.

Every probe is a `Callback` on the `probe` event (some also watch `batch`). They share one
no-grad forward over the probe batch (`ProbeContext.capture`), which collects per-layer
statistics through forward hooks, so the cost is one small forward per probe interval.
`ProbeRunner.maybe_probe(step, batch)` keeps the cadence and fires the event.

Values (flat names, as they appear in the metrics' `probes` dict):
    ppl                      token-level perplexity of the probe batch
    attn_entropy/layers.i    mean attention entropy (nats) per layer
    act_rms/layers.i         RMS of the residual stream after block i
    dead_units/layers.i      fraction of MLP units whose mean |activation| < ratio * layer mean
    rare_mass_pred / rare_mass_data / rare_mass_ratio
                             predicted probability on the rarest tokens vs their data frequency
    token_kl / token_js      data token distribution (since the last probe) vs the baseline
    domain_loss/<name>       probe-batch loss per domain
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.model.llama import Llama

from .config import ProbeConfig
from .hooks import Callback, Event, Hooks

_MAX_LOGIT_ELEMENTS = 1 << 25  # 32M fp32 logits (128 MiB) per probe chunk


@dataclass
class Capture:
    token_loss: torch.Tensor  # [B, T] cross-entropy per token (fp32)
    mean_pred: torch.Tensor  # [V] predicted distribution averaged over loss-masked positions
    act_rms: dict[str, float] = field(default_factory=dict)
    dead_units: dict[str, float] = field(default_factory=dict)
    attn_entropy: dict[str, float] = field(default_factory=dict)


class _Acc:
    """Running sums for per-layer statistics over probe chunks."""

    def __init__(self) -> None:
        self.sq: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self.ent: dict[str, float] = {}
        self.ent_n: dict[str, int] = {}
        self.unit: dict[str, torch.Tensor] = {}
        self.unit_n: dict[str, int] = {}

    @staticmethod
    def _add(d: dict, key: str, v) -> None:
        d[key] = d[key] + v if key in d else v


class ProbeContext:
    """The probe batch, the (unwrapped) model, and a lazily computed shared forward.

    The forward runs in chunks of sequences so that the logits never exceed ~128 MiB, and
    keeps only per-token losses, the mean predicted distribution and per-layer statistics.
    """

    def __init__(self, model: Llama, batch: dict[str, torch.Tensor], step: int, domains: list[str],
                 dead_unit_ratio: float, autocast) -> None:
        self.model, self.batch, self.step, self.domains = model, batch, step, domains
        self.dead_unit_ratio = dead_unit_ratio
        self.values: dict[str, float] = {}
        self._autocast = autocast
        self._capture: Capture | None = None

    def record(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    @property
    def loss_mask(self) -> torch.Tensor:
        m = self.batch.get("loss_mask")
        return m.float() if m is not None else torch.ones_like(self.batch["labels"], dtype=torch.float32)

    def _hooks(self, acc: _Acc) -> list:
        handles = []
        for i, block in enumerate(self.model.layers):
            key = f"layers.{i}"

            def block_out(_m, _inp, out, key=key):
                o = out.float()
                acc._add(acc.sq, key, float(o.pow(2).sum()))
                acc._add(acc.n, key, o.numel())

            def mlp_hidden(_m, args, key=key):
                h = args[0].float().abs().flatten(0, -2)  # [B*T, F] |silu(gate) * up|
                acc._add(acc.unit, key, h.sum(0))
                acc._add(acc.unit_n, key, h.size(0))

            def attn_in(m, args, key=key):
                p = m.attention_probs(args[0], args[1], args[2])  # [B, H, T, T]
                ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [B, H, T]
                acc._add(acc.ent, key, float(ent.sum()))
                acc._add(acc.ent_n, key, ent.numel())

            handles.append(block.register_forward_hook(block_out))
            handles.append(block.mlp.down_proj.register_forward_pre_hook(mlp_hidden))
            handles.append(block.self_attn.register_forward_pre_hook(attn_in))
        return handles

    @torch.no_grad()
    def capture(self) -> Capture:
        if self._capture is not None:
            return self._capture
        ids, labels, mask = self.batch["input_ids"], self.batch["labels"], self.loss_mask
        B, T = ids.shape
        V = self.model.config.vocab_size
        rows = max(1, min(B, _MAX_LOGIT_ELEMENTS // max(T * V, 1)))
        acc = _Acc()
        losses, mass = [], torch.zeros(V, dtype=torch.float64, device=ids.device)
        handles = self._hooks(acc)
        try:
            for s in range(0, B, rows):
                with self._autocast():
                    logits = self.model(ids[s:s + rows]).float()  # [b, T, V]
                losses.append(F.cross_entropy(logits.flatten(0, 1), labels[s:s + rows].flatten(), reduction="none")
                              .view(-1, T))
                m = mask[s:s + rows].flatten()  # [b*T]
                mass += (logits.flatten(0, 1).softmax(-1) * m[:, None]).sum(0).double()
                del logits
        finally:
            for h in handles:
                h.remove()
        mean_pred = (mass / mass.sum().clamp_min(1e-12)).float()
        ratio = self.dead_unit_ratio
        dead = {}
        for k, total in acc.unit.items():
            u = total / acc.unit_n[k]  # [F]
            dead[k] = float((u < ratio * u.mean()).float().mean())
        self._capture = Capture(
            token_loss=torch.cat(losses).float(),
            mean_pred=mean_pred,
            act_rms={k: math.sqrt(v / acc.n[k]) for k, v in acc.sq.items()},
            dead_units=dead,
            attn_entropy={k: v / acc.ent_n[k] for k, v in acc.ent.items()},
        )
        return self._capture

    def token_losses(self) -> torch.Tensor:
        """Per-token cross-entropy [B, T] of the probe batch."""
        return self.capture().token_loss


class PerplexityProbe(Callback):
    def on_probe(self, trainer, ctx: ProbeContext) -> None:
        mask = ctx.loss_mask
        nll = (ctx.token_losses() * mask).sum() / mask.sum().clamp_min(1)
        ctx.record("ppl", math.exp(min(float(nll), 80.0)))


class LayerStatsProbe(Callback):
    """Attention entropy, activation RMS and dead-unit fraction per layer."""

    def on_probe(self, trainer, ctx: ProbeContext) -> None:
        cap = ctx.capture()
        for prefix, values in (("attn_entropy", cap.attn_entropy), ("act_rms", cap.act_rms), ("dead_units", cap.dead_units)):
            for layer, v in values.items():
                ctx.record(f"{prefix}/{layer}", v)


class DomainLossProbe(Callback):
    def on_probe(self, trainer, ctx: ProbeContext) -> None:
        dom = ctx.batch.get("domain")
        if dom is None:
            return
        mask = ctx.loss_mask
        per_seq = (ctx.token_losses() * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
        for d in dom.unique().tolist():
            sel = dom == d
            ctx.record(f"domain_loss/{ctx.domains[d]}", float(per_seq[sel].mean()))


class _TokenCounts:
    def __init__(self, vocab_size: int) -> None:
        self.counts = torch.zeros(vocab_size, dtype=torch.int64)

    def add(self, ids: torch.Tensor) -> None:
        self.counts += torch.bincount(ids.flatten().cpu(), minlength=self.counts.numel())[: self.counts.numel()]


class RareTokenProbe(Callback):
    """Predicted mass on the rarest tokens vs their share of the data.

    Rare tokens: the `quantile` fraction of the tokens that occur in the baseline histogram
    (or, without one, in the tokens trained on so far) with the lowest frequency there. A model that
    under-predicts them (ratio << 1) is collapsing onto frequent tokens.
    """

    name = "rare_tokens"

    def __init__(self, vocab_size: int, quantile: float, baseline: np.ndarray | None = None) -> None:
        self.quantile = quantile
        self.baseline = None if baseline is None else torch.as_tensor(np.asarray(baseline, dtype=np.float64))
        self.seen = _TokenCounts(vocab_size)

    def on_batch(self, trainer, batch: dict[str, torch.Tensor], step: int) -> None:
        if self.baseline is None:
            self.seen.add(batch["labels"])

    def on_probe(self, trainer, ctx: ProbeContext) -> None:
        freq = self.baseline if self.baseline is not None else self.seen.counts.double()
        if freq.sum() <= 0:
            return
        freq = freq / freq.sum()
        # Among the tokens the data holds: a token that never occurs (a byte-fallback piece, an
        # unused id) is absent, not rare, and would make the rare set's data mass 0 in a small
        # vocabulary whose rarest half never occurs.
        present = torch.nonzero(freq > 0).flatten()
        k = max(1, int(self.quantile * present.numel()))
        rare = present[torch.argsort(freq[present], stable=True)[:k]]
        pred = float(ctx.capture().mean_pred.cpu()[rare].sum())
        data = float(freq[rare].sum())
        ctx.record("rare_mass_pred", float(pred))
        ctx.record("rare_mass_data", data)
        ctx.record("rare_mass_ratio", float(pred) / data if data > 0 else float("nan"))

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen.counts = state["seen"].clone()


def kl_js(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> tuple[float, float]:
    """KL(p || q) and Jensen-Shannon divergence (nats) of two histograms (normalised here)."""
    p = p.double() + eps
    q = q.double() + eps
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    kl = float((p * (p / q).log()).sum())
    js = float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())
    return kl, js


class TokenDriftProbe(Callback):
    """Token distribution of the data since the last probe vs a baseline histogram (KL, JS).

    Without a baseline the first window becomes the baseline.
    """

    name = "token_drift"

    def __init__(self, vocab_size: int, baseline: np.ndarray | None = None) -> None:
        self.baseline = None if baseline is None else torch.as_tensor(np.asarray(baseline, dtype=np.float64))
        if self.baseline is not None and self.baseline.numel() != vocab_size:
            raise ValueError(f"baseline histogram has {self.baseline.numel()} bins, the vocabulary {vocab_size}")
        self.window = _TokenCounts(vocab_size)

    def on_batch(self, trainer, batch: dict[str, torch.Tensor], step: int) -> None:
        self.window.add(batch["input_ids"])

    def on_probe(self, trainer, ctx: ProbeContext) -> None:
        counts = self.window.counts
        if counts.sum() == 0:
            return
        if self.baseline is None:
            self.baseline = counts.double().clone()
        kl, js = kl_js(counts, self.baseline)
        ctx.record("token_kl", kl)
        ctx.record("token_js", js)
        self.window.counts = torch.zeros_like(counts)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.counts, "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.counts = state["window"].clone()
        if state.get("baseline") is not None:
            self.baseline = state["baseline"].clone()


def default_probes(vocab_size: int, *, rare_token_quantile: float = 0.5, baseline: np.ndarray | None = None) -> list[Callback]:
    return [
        PerplexityProbe(),
        LayerStatsProbe(),
        DomainLossProbe(),
        RareTokenProbe(vocab_size, rare_token_quantile, baseline),
        TokenDriftProbe(vocab_size, baseline),
    ]


class ProbeRunner:
    """Fires the `probe` event every `probes.every` steps on the first rows of the step's last micro-batch.

    `owner` is what the callbacks receive as `trainer`.
    """

    def __init__(self, cfg: ProbeConfig, model: Llama, domains: list[str], hooks: Hooks, owner: Any, *,
                 device: torch.device, autocast: Callable[[], Any], compiled: bool) -> None:
        self.cfg, self.model, self.domains, self.hooks, self.owner = cfg, model, domains, hooks, owner
        self.device, self.autocast, self.compiled = device, autocast, compiled

    def maybe_probe(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """The values the probes recorded at this step, or None when it is not a probe step."""
        if not self.cfg.enabled or step % self.cfg.every:
            return None
        n = self.cfg.batch_size
        sample = {k: v[:n].to(self.device) for k, v in batch.items()}
        ctx = ProbeContext(self.model, sample, step, self.domains, self.cfg.dead_unit_ratio, self.autocast)
        was_training = self.model.training
        self.model.eval()
        try:
            # Probe hooks on a compiled block would recompile it: run the probe forward eagerly.
            stance = torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()
            with stance, torch.no_grad():
                self.hooks.fire(Event.PROBE, self.owner, ctx=ctx)
        finally:
            self.model.train(was_training)
        return ctx.values
