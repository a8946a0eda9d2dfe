"""Detectors: one per alert kind, each a small state machine over sliding windows of
TrainingMetrics payloads. Pure: no I/O, no clock (the stall check takes `now`).

A detector's `update(obs)` returns one `Finding` per key it could judge on this interval,
active (the condition holds) or not; a key it could not judge (no new probe value, a
non-finite loss for a loss-level detector) is simply absent, so an open incident neither
extends nor counts towards its resolution. Turning findings into alerts (de-duplication,
cool-down, resolution, incident ids) is the monitor's job (`monitor.py`).

Metric naming this module relies on (as the trainer writes them, see
`services/trainer/probes.py` and `services/trainer/stability.py`):

    grad_norm_per_layer   {'layers.<i>', 'embed_tokens', 'norm', 'lm_head'} -> norm
    probes (flat names)   per-layer probes are '<probe>/<layer>', e.g. 'dead_units/layers.3',
                          'attn_entropy/layers.0'; whole-model probes have no slash:
                          'rare_mass_ratio' (predicted / data mass of the rarest tokens),
                          'token_js' (JS divergence, nats, of the recent data tokens vs the
                          baseline histogram), 'token_kl', 'ppl'.

The probe names are configurable (`HealthConfig.dead_neurons.probe`, ...). A per-layer
detector names the layer at fault in `AlertEvidence.layer`, and its incidents are kept
apart per layer.

Incident keys, the third part of the de-duplication key (run, kind, key):
    dead_neurons, attention_entropy_collapse  the layer
    stagnation                                'loss' (training) or 'val_loss' (validation)
    every other kind                          None: one incident at a time per run; for
                                              grad_explosion the worst layer is named in the
                                              evidence, because an exploding layer and the
                                              global norm are one event for the trainer's
                                              policy, and one rollback is wanted, not several.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from contracts.events import AlertEvidence, TrainingMetrics

from .config import (
    AttentionEntropyConfig,
    DeadNeuronsConfig,
    DivergenceConfig,
    GradExplosionConfig,
    HealthConfig,
    LossScaleConfig,
    LossSpikeConfig,
    NonFiniteConfig,
    RareTokenConfig,
    StagnationConfig,
    StallConfig,
    ThroughputConfig,
    TokenDriftConfig,
)
from .windows import MAD_TO_SIGMA, RunningMin, StepWindow, Window, mad, median, slope

PER_LAYER_KINDS = frozenset({"dead_neurons", "attention_entropy_collapse"})
REFRESH = 8  # pushes between recomputations of a window's median/MAD (see Window.robust)
RECENT_REFRESH = 2  # ... of a short window's, which must follow the series closely


def incident_key(kind: str, evidence: AlertEvidence) -> str | None:
    """The key that keeps incidents of one kind apart within a run (see the module doc).

    Derived from what an alert carries, so that a restarted monitor can rebuild its
    incidents from the alerts it published.
    """
    if kind in PER_LAYER_KINDS:
        return evidence.layer
    if kind == "stagnation":
        return "val_loss" if evidence.statistic.startswith("val_loss") else "loss"
    return None


@dataclass(slots=True)
class Finding:
    """One detector's verdict on one key for one interval."""

    kind: str
    key: str | None
    active: bool
    statistic: str
    value: float
    threshold: float
    window: dict[str, float] = field(default_factory=dict)
    values: list[float] = field(default_factory=list)
    layer: str | None = None
    message: str = ""

    def evidence(self) -> AlertEvidence:
        return AlertEvidence(statistic=self.statistic, value=self.value, threshold=self.threshold,
                             window=dict(self.window), values=list(self.values), layer=self.layer)


class Observation:
    """One metrics event, with its probes grouped once for all detectors."""

    __slots__ = ("_groups", "m", "probes_changed")

    def __init__(self, m: TrainingMetrics, probes_changed: bool = True) -> None:
        self.m = m
        # Probes run every few log intervals and the trainer repeats their latest values in
        # between: an unchanged dict carries no new information.
        self.probes_changed = probes_changed
        self._groups: dict[str, dict[str, float]] | None = None

    def layer_probes(self, probe: str) -> dict[str, float]:
        """{layer: value} of the probes named '<probe>/<layer>'."""
        if self._groups is None:
            groups: dict[str, dict[str, float]] = {}
            for name, v in self.m.probes.items():
                p, sep, layer = name.partition("/")
                if sep:
                    groups.setdefault(p, {})[layer] = v
            self._groups = groups
        return self._groups.get(probe, {})


def _isfinite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class Detector(ABC):
    kind: ClassVar[str]

    @abstractmethod
    def update(self, obs: Observation) -> list[Finding]:
        """Findings for this interval (active or not, per key)."""

    def rewind(self, step: int) -> None:  # noqa: B027  (a detector without history has nothing to forget)
        """The trainer rolled back to `step`: forget what was logged at or after it."""


# --- loss and gradients --------------------------------------------------------------------


class NonFiniteDetector(Detector):
    """A NaN/Inf loss or gradient norm fires at once."""

    kind = "non_finite"

    def __init__(self, cfg: NonFiniteConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.recent = Window(n_values)
        self.run = 0

    def update(self, obs: Observation) -> list[Finding]:
        m = obs.m
        self.recent.push(m.step, m.loss)
        loss_bad = not math.isfinite(m.loss)
        grad_bad = not math.isfinite(m.grad_norm)
        layer = next((k for k, v in m.grad_norm_per_layer.items() if not math.isfinite(v)), None)
        if (grad_bad or layer) and not loss_bad and m.loss_scale is not None and self.cfg.fp16_overflow_is_benign:
            grad_bad, layer = False, None  # the GradScaler skips the step and lowers the scale
        active = loss_bad or grad_bad or layer is not None
        self.run = self.run + 1 if active else 0
        what = "loss" if loss_bad else "grad_norm" if grad_bad else f"grad_norm[{layer}]"
        return [Finding(
            self.kind, None, active, "non_finite_intervals", float(self.run), 1.0,
            {"loss": m.loss, "grad_norm": m.grad_norm}, self.recent.values, layer,
            f"non-finite {what} at step {m.step} (loss={m.loss}, grad_norm={m.grad_norm})" if active else "",
        )]

    def rewind(self, step: int) -> None:
        self.recent.rewind(step)
        self.run = 0


class LossSpikeDetector(Detector):
    """Robust z-score of the loss against a rolling median/MAD.

    Each new loss is compared with the level just before it (the median of the last few
    intervals) as a relative residual r = loss / level - 1, and r is scored against the
    rolling median and MAD of the same residual over the window. Scoring the residual
    (not the loss itself) keeps the detector calibrated while the loss falls: a falling
    curve inflates the MAD of the values, not that of the residuals, and correlated noise
    is measured in the same terms as the spike.
    """

    kind = "loss_spike"

    def __init__(self, cfg: LossSpikeConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.losses = Window(max(cfg.level_window, n_values))
        self.resid = Window(cfg.window)
        self.recent = Window(cfg.recent_window)

    def update(self, obs: Observation) -> list[Finding]:
        m, cfg = obs.m, self.cfg
        x = m.loss
        if not math.isfinite(x):
            return []
        out: list[Finding] = []
        if len(self.losses):
            level = median(self.losses.last(cfg.level_window))
            r = x / level - 1.0 if level > 0 else 0.0
            if len(self.resid) >= cfg.min_history:
                center, spread = self.resid.robust(REFRESH)
                if len(self.recent) >= cfg.recent_window // 2:  # (after a rollback it refills)
                    spread = max(spread, self.recent.robust(RECENT_REFRESH)[1])
                sigma = max(MAD_TO_SIGMA * spread, cfg.sigma_floor_rel)
                z = (r - center) / sigma
                active = z > cfg.z_threshold and r > cfg.min_rel_jump
                out.append(Finding(
                    self.kind, None, active, "robust_z(loss / level - 1)", z, cfg.z_threshold,
                    {"level": level, "rel_jump": r, "median_residual": center, "sigma_residual": sigma,
                     "n": float(len(self.resid))},
                    (self.losses.values + [x])[-self.n_values:], None,
                    f"loss spike at step {m.step}: {x:.4g} is {r:+.0%} over the rolling level {level:.4g} "
                    f"(robust z {z:.1f})" if active else "",
                ))
            self.resid.push(m.step, r)
            self.recent.push(m.step, r)
        self.losses.push(m.step, x)
        return out

    def rewind(self, step: int) -> None:
        self.losses.rewind(step)
        self.resid.rewind(step)
        self.recent.rewind(step)


class DivergenceDetector(Detector):
    """The loss level trends up over a window, or exceeds k x the best level so far (by more
    than the loss's own noise allows: the best level of a noisy run is a low outlier).

    The level is a short median, so that a spike of one or two intervals (the loss-spike
    detector's business) neither raises it nor counts as a trend. A trend must rise both
    by a fraction and by a multiple of the loss's relative noise (measured as in
    LossSpikeDetector), and the raw losses' slope must be significant.
    """

    kind = "divergence"

    def __init__(self, cfg: DivergenceConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.losses = Window(max(cfg.level_window, cfg.trend_window, cfg.best_window, n_values))
        self.resid = Window(cfg.noise_window)
        # Residuals reach the noise estimate `level_window` intervals late: the intervals that
        # make up the current level are the ones under test, and an excursion must not widen
        # the yardstick it is measured with.
        self.pending: deque[tuple[int, float]] = deque()
        self.levels = Window(cfg.trend_window)
        self.best = RunningMin()

    def update(self, obs: Observation) -> list[Finding]:
        m, cfg = obs.m, self.cfg
        x = m.loss
        if not math.isfinite(x):
            return []
        if len(self.losses):
            prev = median(self.losses.last(cfg.level_window))
            if prev > 0:
                self.pending.append((m.step, x / prev - 1.0))
                while len(self.pending) > cfg.level_window:
                    self.resid.push(*self.pending.popleft())
        self.losses.push(m.step, x)
        level = median(self.losses.last(cfg.level_window))
        self.levels.push(m.step, level)
        best = self.best.value
        # The best level is the running minimum of a longer median: the minimum of the short
        # level is biased low by noise (a lucky run of easy batches), and would make a normal
        # level look like a multiple of it.
        self.best.push(m.step, median(self.losses.last(cfg.best_window)))
        if len(self.resid) < cfg.min_history or best is None or best <= 0:
            return []
        ratio = level / best
        levels = self.levels.values
        lo = min(levels)
        sigma = max(MAD_TO_SIGMA * self.resid.robust(REFRESH)[1], 1e-3)
        rise = level / lo - 1.0 if lo > 0 else 0.0
        need = max(cfg.trend_min_rise, cfg.trend_z * sigma)
        _, t = slope(self.losses.last(cfg.trend_window))
        trend = rise > need and t > cfg.trend_t
        above = ratio > cfg.ratio_to_best and ratio - 1.0 > cfg.ratio_z * sigma
        active = above or trend
        if above or not trend:
            stat, value, thr = "loss_level / best_level", ratio, cfg.ratio_to_best
        else:
            stat, value, thr = "rise(loss_level)", rise, need
        return [Finding(
            self.kind, None, active, stat, value, thr,
            {"level": level, "best": best, "window_min": lo, "rise": rise, "sigma_residual": sigma, "slope_t": t,
             "n": float(len(self.resid))},
            self.losses.last(self.n_values), None,
            (f"divergence at step {m.step}: loss level {level:.4g} is {ratio:.2f}x the best {best:.4g}" if above else
             f"divergence at step {m.step}: loss level rose {rise:+.0%} within {len(levels)} intervals "
             f"(slope t={t:.1f})") if active else "",
        )]

    def rewind(self, step: int) -> None:
        self.losses.rewind(step)
        self.resid.rewind(step)
        self.pending = deque(p for p in self.pending if p[0] < step)
        self.levels.rewind(step)
        self.best.rewind(step)


def stagnation_span(cfg: StagnationConfig, step: int, log_every: float) -> float:
    """Steps over which the training loss must improve (see StagnationConfig)."""
    return max(cfg.train_steps, cfg.train_fraction * step, cfg.min_intervals * log_every)


class StagnationDetector(Detector):
    """No improvement beyond epsilon: of the training loss over N steps, of val_loss over
    M evaluations.

    Training: the loss level now (median of the last `block_fraction` of the span) against
    the level one span earlier (median of a block as long, ending where the span starts).
    Medians of blocks, because the difference of two single noisy values (or of two
    minima) is dominated by the noise long before a slow loss curve has moved by epsilon,
    and a short divergence or a spike inside a block does not move its median.
    """

    kind = "stagnation"

    def __init__(self, cfg: StagnationConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.hist: deque[tuple[int, float]] = deque()  # (step, loss) covering span + block
        self.deltas = Window(16)  # steps between log intervals
        self.vals: list[tuple[int, float]] = []
        self._calls = 0
        self._stagnating = False
        self._below = 0  # checks in a row below epsilon

    def update(self, obs: Observation) -> list[Finding]:
        out = []
        f = self._train(obs.m)
        if f is not None:
            out.append(f)
        f = self._val(obs.m)
        if f is not None:
            out.append(f)
        return out

    def _train(self, m: TrainingMetrics) -> Finding | None:
        cfg = self.cfg
        if not math.isfinite(m.loss):
            return None
        if self.hist and m.step > self.hist[-1][0]:
            self.deltas.push(m.step, m.step - self.hist[-1][0])
        self.hist.append((m.step, m.loss))
        le = self.deltas.median() if len(self.deltas) else 1.0
        span = stagnation_span(cfg, m.step, le)
        block = cfg.block_fraction * span
        start = m.step - span - block
        while len(self.hist) > 1 and self.hist[1][0] <= start:
            self.hist.popleft()
        if self.hist[0][0] > start + le:
            return None  # not a full span of history yet
        # Two medians over up to hundreds of values: judged a few times per block, not on every interval.
        self._calls += 1
        if self._calls % max(1, int(block / le / cfg.checks_per_block)):
            return None
        ref = [v for st, v in self.hist if st <= m.step - span]
        recent = [v for st, v in self.hist if st > m.step - block]
        if len(ref) < 3 or len(recent) < 3:
            return None
        then, now = median(ref), median(recent)
        improvement = (then - now) / then if then > 0 else 0.0
        if self._stagnating:
            active = improvement < cfg.train_epsilon * cfg.clear_factor
        else:
            self._below = self._below + 1 if improvement < cfg.train_epsilon else 0
            active = self._below >= cfg.confirm_checks
        self._stagnating = active
        return Finding(
            self.kind, "loss", active, f"loss_improvement over {span:.0f} steps", improvement, cfg.train_epsilon,
            {"level_then": then, "level_now": now, "span_steps": span, "block_steps": block,
             "n_then": float(len(ref)), "n_now": float(len(recent))},
            recent[-self.n_values:], None,
            f"stagnation at step {m.step}: the loss level improved {improvement:.2%} in {span:.0f} steps "
            f"({then:.4g} -> {now:.4g}; needs {cfg.train_epsilon:.2%})" if active else "",
        )

    def _val(self, m: TrainingMetrics) -> Finding | None:
        cfg = self.cfg
        v = m.val_loss
        if not _isfinite(v) or (self.vals and self.vals[-1][1] == v):
            return None
        self.vals.append((m.step, v))
        span = max(cfg.train_steps, cfg.train_fraction * m.step)
        k = cfg.val_evals
        while k < len(self.vals) and self.vals[-k - 1][0] >= m.step - span:
            k += 1  # widen to the step span
        if len(self.vals) <= k:
            return None
        best_before = min(x for _, x in self.vals[:-k])
        best_recent = min(x for _, x in self.vals[-k:])
        improvement = (best_before - best_recent) / best_before if best_before > 0 else 0.0
        active = improvement < cfg.val_epsilon
        return Finding(
            self.kind, "val_loss", active, f"val_loss_improvement over {k} evaluations", improvement,
            cfg.val_epsilon, {"best_before": best_before, "best_recent": best_recent, "evaluations": float(k)},
            [x for _, x in self.vals[-self.n_values:]], None,
            f"stagnation at step {m.step}: val_loss improved {improvement:.2%} over the last {k} "
            f"evaluations (needs {cfg.val_epsilon:.2%})" if active else "",
        )

    def rewind(self, step: int) -> None:
        while self.hist and self.hist[-1][0] >= step:
            self.hist.pop()
        self.deltas.rewind(step)
        self.vals = [(s, v) for s, v in self.vals if s < step]
        self._stagnating, self._below = False, 0


class GradExplosionDetector(Detector):
    """The global grad norm against its rolling median, and each layer against its own.

    The baselines stop learning while the detector fires (up to `freeze_cap` intervals),
    so that a lasting explosion does not become the new normal within one window.
    """

    kind = "grad_explosion"

    def __init__(self, cfg: GradExplosionConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.norms = Window(cfg.window)
        self.logs = Window(cfg.window)
        # Per layer: (step, norm) history and its median, refreshed for all layers every
        # REFRESH pushes (a model has dozens of layers; this is the monitor's hottest loop).
        self.layers: dict[str, deque[tuple[int, float]]] = {}
        self.layer_median: dict[str, float] = {}
        self._pushes = 0
        self.frozen = 0

    def update(self, obs: Observation) -> list[Finding]:
        m, cfg = obs.m, self.cfg
        g = m.grad_norm
        if not math.isfinite(g) or g <= 0.0:
            return []
        out: list[Finding] = []
        active = False
        if len(self.norms) >= cfg.min_history:
            med = self.norms.robust(REFRESH)[0]
            ratio = g / med if med > 0 else math.inf
            lmed, lmad = self.logs.robust(REFRESH)
            lsig = max(MAD_TO_SIGMA * lmad, 0.05)
            z = (math.log(g) - lmed) / lsig
            global_fires = ratio > cfg.ratio and z > cfg.z_threshold
            worst, worst_ratio = None, 0.0
            medians = self.layer_median
            for name, v in m.grad_norm_per_layer.items():
                lm = medians.get(name)
                if lm is not None and v > 0.0 and v / lm > worst_ratio:  # False for NaN
                    worst, worst_ratio = name, v / lm
            layer_fires = worst_ratio > cfg.layer_ratio
            active = global_fires or layer_fires
            stat, value, thr = (("grad_norm / rolling median", ratio, cfg.ratio) if global_fires or not layer_fires
                                else (f"grad_norm[{worst}] / its rolling median", worst_ratio, cfg.layer_ratio))
            out.append(Finding(
                self.kind, None, active, stat, value, thr,
                {"grad_norm": g, "median": med, "ratio": ratio, "robust_z_log": z, "worst_layer_ratio": worst_ratio,
                 "n": float(len(self.norms))},
                (self.norms.values + [g])[-self.n_values:], worst if active else None,
                f"gradient explosion at step {m.step}: grad norm {g:.4g} is {ratio:.1f}x its rolling median {med:.4g}"
                + (f"; worst layer {worst} at {worst_ratio:.1f}x its own" if worst else "") if active else "",
            ))
        self.frozen = self.frozen + 1 if active else 0
        if not active or self.frozen > cfg.freeze_cap:
            self.norms.push(m.step, g)
            self.logs.push(m.step, math.log(g))
            for name, v in m.grad_norm_per_layer.items():
                if math.isfinite(v) and v > 0.0:
                    d = self.layers.get(name)
                    if d is None:
                        d = self.layers[name] = deque(maxlen=cfg.window)
                    d.append((m.step, v))
            self._pushes += 1
            if self._pushes % REFRESH == 0 or self._pushes <= cfg.min_history:
                self._refresh_layers()
        return out

    def _refresh_layers(self) -> None:
        need = self.cfg.min_history
        self.layer_median = {name: med for name, d in self.layers.items()
                             if len(d) >= need and (med := median([v for _, v in d])) > 0}

    def rewind(self, step: int) -> None:
        self.norms.rewind(step)
        self.logs.rewind(step)
        for d in self.layers.values():
            while d and d[-1][0] >= step:
                d.pop()
        self._refresh_layers()
        self.frozen = 0


class LossScaleDetector(Detector):
    """fp16 only (a loss scale is reported): the scale under a floor, or overflow steps
    (increments of skipped_steps) more frequent than a rate over a window of steps."""

    kind = "loss_scale_collapse"

    def __init__(self, cfg: LossScaleConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.skips = StepWindow(cfg.window_steps)
        self.scales = Window(n_values)

    def update(self, obs: Observation) -> list[Finding]:
        m, cfg = obs.m, self.cfg
        if m.loss_scale is None:
            return []
        self.skips.push(m.step, float(m.skipped_steps))
        self.scales.push(m.step, m.loss_scale)
        covered = self.skips.covered
        rate = 0.0
        if covered >= cfg.min_steps:
            rate = max(0.0, self.skips.newest[1] - self.skips.oldest[1]) / covered
        low = m.loss_scale < cfg.floor
        frequent = rate > cfg.max_overflow_rate
        active = low or frequent
        stat, value, thr = (("loss_scale", m.loss_scale, cfg.floor) if low or not frequent
                            else (f"overflow_rate over {covered} steps", rate, cfg.max_overflow_rate))
        return [Finding(
            self.kind, None, active, stat, value, thr,
            {"loss_scale": m.loss_scale, "overflow_rate": rate, "steps": float(covered),
             "skipped_steps": float(m.skipped_steps)},
            self.scales.values, None,
            (f"loss scale collapsed at step {m.step}: {m.loss_scale:.3g} < {cfg.floor:.3g}" if low else
             f"fp16 overflow at step {m.step}: {rate:.0%} of the last {covered} steps skipped") if active else "",
        )]

    def rewind(self, step: int) -> None:
        self.skips.rewind(step)
        self.scales.rewind(step)


# --- probes ----------------------------------------------------------------------------------


class _ProbeSeries:
    """History of one probe value: only changed values are new (probes repeat between runs)."""

    __slots__ = ("frozen", "last", "ref")

    def __init__(self, window: int) -> None:
        self.ref = Window(window)
        self.last: float | None = None
        self.frozen = 0


class DeadNeuronsDetector(Detector):
    """Dead-unit fraction per layer above a threshold, or rising fast within a step window."""

    kind = "dead_neurons"

    def __init__(self, cfg: DeadNeuronsConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.hist: dict[str, StepWindow] = {}
        self.last: dict[str, float] = {}

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.cfg
        step = obs.m.step
        out: list[Finding] = []
        if not obs.probes_changed:
            return out
        for layer, v in obs.layer_probes(cfg.probe).items():
            if self.last.get(layer) == v or not math.isfinite(v):
                continue
            self.last[layer] = v
            w = self.hist.get(layer)
            if w is None:
                w = self.hist[layer] = StepWindow(cfg.rise_window_steps)
            lo = min(w.values) if len(w) else v
            rise = v - lo
            high, rising = v > cfg.max_fraction, rise > cfg.max_rise
            active = high or rising
            w.push(step, v)
            stat, value, thr = ((f"{cfg.probe} fraction", v, cfg.max_fraction) if high or not rising
                                else (f"{cfg.probe} rise over {cfg.rise_window_steps} steps", rise, cfg.max_rise))
            out.append(Finding(
                self.kind, layer, active, stat, value, thr, {"fraction": v, "window_min": lo, "rise": rise},
                w.values[-self.n_values:], layer,
                f"dead units in {layer} at step {step}: {v:.0%} of the MLP units"
                + (f" (up {rise:+.0%} within {cfg.rise_window_steps} steps)" if rising else "") if active else "",
            ))
        return out

    def rewind(self, step: int) -> None:
        for w in self.hist.values():
            w.rewind(step)
        self.last.clear()


class _DropDetector(Detector):
    """A probe value below a floor, or below drop_ratio x its recent median (per key)."""

    label: ClassVar[str]

    def __init__(self, cfg: AttentionEntropyConfig | RareTokenConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.series: dict[str | None, _ProbeSeries] = {}

    @property
    @abstractmethod
    def floor(self) -> float:
        """The probe value below which the series counts as collapsed."""

    @abstractmethod
    def _values(self, obs: Observation) -> dict[str | None, float]:
        """This interval's probe values by key (layer)."""

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.cfg
        step = obs.m.step
        out: list[Finding] = []
        if not obs.probes_changed:
            return out
        for key, v in self._values(obs).items():
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = _ProbeSeries(cfg.window)
            if s.last == v or not math.isfinite(v):
                continue
            s.last = v
            floor = self.floor
            ref = median(s.ref.values) if len(s.ref) >= cfg.min_history else None
            ratio = v / ref if ref else math.inf
            below_floor = v < floor
            dropped = ratio < cfg.drop_ratio
            active = below_floor or dropped
            stat, value, thr = ((f"{cfg.probe} / recent median", ratio, cfg.drop_ratio) if dropped
                                else (cfg.probe, v, floor))
            out.append(Finding(
                self.kind, key if self.kind in PER_LAYER_KINDS else None, active, stat, value, thr,
                {"value": v, "median": ref if ref is not None else math.nan, "ratio": ratio,
                 "n": float(len(s.ref))},
                (s.ref.values + [v])[-self.n_values:], key,
                f"{self.label}{f' in {key}' if key else ''} at step {step}: {cfg.probe}={v:.4g}"
                + (f", {ratio:.0%} of its recent median {ref:.4g}" if ref else "") if active else "",
            ))
            s.frozen = s.frozen + 1 if active else 0
            if not active or s.frozen > cfg.freeze_cap:
                s.ref.push(step, v)
        return out

    def rewind(self, step: int) -> None:
        for s in self.series.values():
            s.ref.rewind(step)
            s.last, s.frozen = None, 0


class AttentionEntropyDetector(_DropDetector):
    """Mean attention entropy of a layer collapsing (heads attending to one token)."""

    kind = "attention_entropy_collapse"
    label = "attention entropy collapse"

    @property
    def floor(self) -> float:
        return self.cfg.floor_nats  # type: ignore[union-attr]

    def _values(self, obs: Observation) -> dict[str | None, float]:
        return obs.layer_probes(self.cfg.probe)  # type: ignore[return-value]


class RareTokenDetector(_DropDetector):
    """The model's predicted mass on rare tokens collapsing against their data frequency."""

    kind = "rare_token_collapse"
    label = "rare-token collapse"

    @property
    def floor(self) -> float:
        return self.cfg.floor  # type: ignore[union-attr]

    def _values(self, obs: Observation) -> dict[str | None, float]:
        v = obs.m.probes.get(self.cfg.probe)
        return {} if v is None else {None: v}


class TokenDriftDetector(Detector):
    """The data's token distribution jumping away from the baseline (JS divergence)."""

    kind = "token_drift"

    def __init__(self, cfg: TokenDriftConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.s = _ProbeSeries(cfg.window)

    def update(self, obs: Observation) -> list[Finding]:
        cfg, s = self.cfg, self.s
        if not obs.probes_changed:
            return []
        v = obs.m.probes.get(cfg.probe)
        if v is None or v == s.last or not math.isfinite(v):
            return []
        s.last = v
        z, med = 0.0, math.nan
        relative = False
        if len(s.ref) >= cfg.min_history:
            vals = s.ref.values
            med = median(vals)
            sigma = max(MAD_TO_SIGMA * mad(vals, med), cfg.sigma_floor_rel * abs(med), 1e-12)
            z = (v - med) / sigma
            relative = z > cfg.z_threshold and v > cfg.min_ratio * med
        absolute = v > cfg.max_js
        active = absolute or relative
        stat, value, thr = (("robust_z(token_js)", z, cfg.z_threshold) if relative and not absolute
                            else (cfg.probe, v, cfg.max_js))
        out = [Finding(
            self.kind, None, active, stat, value, thr, {"value": v, "median": med, "robust_z": z, "n": float(len(s.ref))},
            (s.ref.values + [v])[-self.n_values:], None,
            f"token distribution drift at step {obs.m.step}: {cfg.probe}={v:.3g} nats"
            + (f" ({z:.1f} sigma above its recent median {med:.3g})" if len(s.ref) >= cfg.min_history else "")
            if active else "",
        )]
        s.frozen = s.frozen + 1 if active else 0
        if not active or s.frozen > cfg.freeze_cap:
            s.ref.push(obs.m.step, v)
        return out

    def rewind(self, step: int) -> None:
        self.s.ref.rewind(step)
        self.s.last, self.s.frozen = None, 0


# --- the machine ------------------------------------------------------------------------------


class ThroughputDetector(Detector):
    """tokens/s falling below its rolling median: suddenly (below `drop_ratio` x for a few
    intervals in a row) or lastingly (the last few intervals all below `sustain_ceiling` x
    and their median below `sustain_ratio` x, which also catches a slide).

    The baseline takes no value that is itself low, so neither a drop nor a slow slide
    drags it down (for at most `freeze_cap` intervals: after that a lasting new rate is
    the normal one). A change of sequence length or batch size changes the normal rate:
    the baseline starts over.
    """

    kind = "throughput_drop"

    def __init__(self, cfg: ThroughputConfig, n_values: int = 16) -> None:
        self.cfg = cfg
        self.n_values = n_values
        self.w = Window(cfg.window)
        self.recent = Window(cfg.sustain_window)
        self.regime: tuple[int, int] | None = None
        self.low_run = 0
        self.frozen = 0

    def update(self, obs: Observation) -> list[Finding]:
        m, cfg = obs.m, self.cfg
        r = m.tokens_per_s
        if not math.isfinite(r) or r <= 0.0:
            return []
        regime = (m.seq_len, m.batch_size)
        if regime != self.regime:
            self.regime = regime
            self.w.clear()
            self.recent.clear()
            self.low_run = self.frozen = 0
        self.recent.push(m.step, r)
        out = []
        slow = False
        if len(self.w) >= cfg.min_history:
            med = self.w.robust(REFRESH)[0]
            ratio = r / med if med > 0 else 1.0
            recent = self.recent.values
            sustained = median(recent) / med if med > 0 else 1.0
            slow = ratio < cfg.sustain_ratio
            self.low_run = self.low_run + 1 if ratio < cfg.drop_ratio else 0
            sudden = self.low_run >= cfg.consecutive
            lasting = (len(recent) >= cfg.sustain_window and sustained < cfg.sustain_ratio
                       and max(recent) < cfg.sustain_ceiling * med)
            active = sudden or lasting
            if sudden or not lasting:
                stat, value, thr = "tokens_per_s / rolling median", ratio, cfg.drop_ratio
                what = f"{ratio:.0%} of the rolling median {med:,.0f} for {self.low_run} intervals"
            else:
                stat, value, thr = "recent median tokens_per_s / rolling median", sustained, cfg.sustain_ratio
                what = (f"the last {len(recent)} intervals are all under {cfg.sustain_ceiling:.0%}, their median "
                        f"{sustained:.0%}, of the rolling median {med:,.0f}")
            out.append(Finding(
                self.kind, None, active, stat, value, thr,
                {"tokens_per_s": r, "median": med, "ratio": ratio, "recent_ratio": sustained,
                 "low_intervals": float(self.low_run), "n": float(len(self.w))},
                (self.w.values + [r])[-self.n_values:], None,
                f"throughput drop at step {m.step}: {r:,.0f} tokens/s; {what}" if active else "",
            ))
        self.frozen = self.frozen + 1 if slow else 0
        if not slow or self.frozen > cfg.freeze_cap:
            self.w.push(m.step, r)
        return out

    def rewind(self, step: int) -> None:
        self.w.rewind(step)
        self.recent.rewind(step)
        self.low_run = self.frozen = 0


def stall_threshold_s(cfg: StallConfig, gaps: list[float]) -> float:
    """Seconds of silence that make an active trainer 'stalled'."""
    typical = median(gaps) if gaps else 0.0
    return max(cfg.min_s, cfg.gap_factor * typical)


def check_stall(cfg: StallConfig, now: float, last_seen: float, gaps: list[float], step: int | None) -> Finding:
    """Whether a run whose last metrics arrived at `last_seen` is stalled at `now`."""
    limit = stall_threshold_s(cfg, gaps)
    silent = now - last_seen
    active = silent > limit
    return Finding(
        "trainer_stalled", None, active, "seconds_since_metrics", silent, limit,
        {"median_gap_s": median(gaps) if gaps else math.nan, "last_step": float(step if step is not None else -1)},
        gaps[-16:], None,
        f"trainer stalled: no metrics for {silent:.0f} s (limit {limit:.0f} s)"
        + (f", last step {step}" if step is not None else "") if active else "",
    )


def build_detectors(cfg: HealthConfig) -> list[Detector]:
    """The enabled metric detectors, in a fixed order (alerts of one interval come in it)."""
    n = cfg.alerts.evidence_values
    pairs: list[tuple[bool, Detector]] = [
        (cfg.non_finite.enabled, NonFiniteDetector(cfg.non_finite, n)),
        (cfg.divergence.enabled, DivergenceDetector(cfg.divergence, n)),
        (cfg.loss_spike.enabled, LossSpikeDetector(cfg.loss_spike, n)),
        (cfg.grad_explosion.enabled, GradExplosionDetector(cfg.grad_explosion, n)),
        (cfg.loss_scale.enabled, LossScaleDetector(cfg.loss_scale, n)),
        (cfg.stagnation.enabled, StagnationDetector(cfg.stagnation, n)),
        (cfg.dead_neurons.enabled, DeadNeuronsDetector(cfg.dead_neurons, n)),
        (cfg.attention_entropy.enabled, AttentionEntropyDetector(cfg.attention_entropy, n)),
        (cfg.rare_tokens.enabled, RareTokenDetector(cfg.rare_tokens, n)),
        (cfg.token_drift.enabled, TokenDriftDetector(cfg.token_drift, n)),
        (cfg.throughput.enabled, ThroughputDetector(cfg.throughput, n)),
    ]
    return [d for enabled, d in pairs if enabled]
