"""Health-monitor configuration: every threshold, window and default action in one model.

Windows are counted in log intervals (one TrainingMetrics event each) unless the name
says `_steps` (optimizer steps) or `_s` (seconds). Probe-based detectors count probe
evaluations: probes run every `probes.every` steps, so their values repeat between two
probe runs and only a changed value is new information.

The defaults were tuned on the synthetic benchmark (`benchmarks/health.py`, tuning seeds
disjoint from the seeds it reports) and sit well inside the published practice: OLMo-core
skips updates beyond 6 sigma over 128 steps, llm-foundry flags a loss above 2x the window
mean.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import Field, model_validator

from contracts.events import AlertKind, RecommendedAction, Severity
from shared.config import FrozenStrictModel
from shared.runs import section

ALERT_KINDS: tuple[AlertKind, ...] = get_args(AlertKind)
"""Every alert kind, in the contract's order (one source of truth: contracts.events.AlertKind)."""


class NonFiniteConfig(FrozenStrictModel):
    enabled: bool = True
    fp16_overflow_is_benign: bool = Field(
        default=True,
        description="With a loss scale (fp16), an infinite gradient under a finite loss is the GradScaler's "
        "ordinary overflow (it skips the step and halves the scale): leave it to loss_scale_collapse.",
    )


class LossSpikeConfig(FrozenStrictModel):
    enabled: bool = True
    window: int = Field(default=64, ge=4, description="Residuals in the noise-scale window (a MAD over fewer than "
                        "~50 values is itself too noisy: it under-reads the noise by 30-40% now and then).")
    recent_window: int = Field(default=16, ge=4, description="The noise scale is the larger of the window's MAD and "
                               "that of this many recent residuals: noise that grows (early in training, as the "
                               "domains' losses part) is seen at once, while a quiet stretch does not make the "
                               "detector jumpy.")
    level_window: int = Field(default=5, ge=1, description="Intervals whose median is the loss level a new value "
                              "is compared with.")
    min_history: int = Field(default=20, ge=3, description="Residuals needed before the detector speaks (a MAD of "
                             "fewer is too unsure a noise scale).")
    z_threshold: float = Field(default=8.0, gt=0, description="Robust z-score of (loss / level - 1) against the "
                               "same residual's rolling median/MAD that fires.")
    min_rel_jump: float = Field(default=0.05, ge=0, description="...and the loss must exceed the level by this fraction.")
    sigma_floor_rel: float = Field(default=0.002, ge=0, description="Noise scale floor, as a fraction of the level.")
    repeat_k: int = Field(default=3, ge=2, description="Spikes within repeat_window_steps that escalate to a rollback.")
    repeat_window_steps: int = Field(default=2000, ge=1, description="Window for counting repeated spikes.")


class DivergenceConfig(FrozenStrictModel):
    enabled: bool = True
    min_history: int = Field(default=16, ge=3, description="Intervals needed before the detector speaks.")
    level_window: int = Field(default=5, ge=1, description="Median of this many intervals is the loss level "
                              "(5 ignores a spike of up to two intervals).")
    ratio_to_best: float = Field(default=1.5, gt=1, description="Fire when the level exceeds this x the best level so far.")
    best_window: int = Field(default=15, ge=1, description="The best level is the running minimum of a median over "
                             "this many intervals (longer than level_window, so noise does not set it).")
    ratio_z: float = Field(default=2.5, ge=0, description="...and the excess over the best is this many times the loss's "
                           "relative noise: with small, mixed-domain batches the best level is itself a low outlier.")
    trend_window: int = Field(default=12, ge=4, description="Intervals in which a rise is looked for.")
    trend_min_rise: float = Field(default=0.06, ge=0, description="Rise of the level above the window's lowest level, "
                                  "as a fraction, needed to call a trend.")
    trend_z: float = Field(default=6.0, gt=0, description="...and that rise in units of the loss's relative noise.")
    trend_t: float = Field(default=3.0, gt=0, description="...and the t-statistic of the window's slope.")
    noise_window: int = Field(default=32, ge=4, description="Intervals of residuals for the noise-scale estimate.")


class StagnationConfig(FrozenStrictModel):
    enabled: bool = True
    train_steps: int = Field(default=2000, ge=1, description="Training loss: no improvement over this many steps...")
    train_fraction: float = Field(default=0.15, ge=0, le=1, description="...or over this fraction of the steps so far, "
                                  "whichever is longer: a healthy loss curve is close to a power law in steps, so its "
                                  "progress per fixed number of steps shrinks late in a run.")
    min_intervals: int = Field(default=100, ge=4, description="...and over at least this many log intervals, so that "
                               "the levels compared are medians of enough values to see through the noise.")
    block_fraction: float = Field(default=0.5, gt=0, le=1, description="The levels compared are medians over blocks "
                                  "this fraction of the span long.")
    train_epsilon: float = Field(default=0.0025, ge=0, description="Relative improvement of the loss level that counts "
                                 "as progress.")
    checks_per_block: int = Field(default=16, ge=1, description="How often the training check runs: this many times "
                                  "per block (it sorts hundreds of values; progress over a span moves slowly).")
    confirm_checks: int = Field(default=2, ge=1, description="Checks in a row below epsilon before it fires.")
    clear_factor: float = Field(default=2.0, ge=1, description="Once stagnating, the improvement must exceed this x "
                                "epsilon to count as progress again (hysteresis: no flicker around epsilon).")
    val_evals: int = Field(default=5, ge=1, description="Validation: no improvement over this many evaluations, "
                           "and over at least the training loss's step span (frequent evaluations are close together).")
    val_epsilon: float = Field(default=0.001, ge=0, description="Relative improvement of val_loss that counts.")


class GradExplosionConfig(FrozenStrictModel):
    enabled: bool = True
    window: int = Field(default=32, ge=4, description="Intervals in the rolling median of the grad norm.")
    min_history: int = Field(default=10, ge=3, description="Intervals needed before the detector speaks.")
    ratio: float = Field(default=7.0, gt=1, description="Global grad norm / its rolling median that fires.")
    layer_ratio: float = Field(default=10.0, gt=1, description="A layer's grad norm / its own rolling median that fires.")
    z_threshold: float = Field(default=6.0, gt=0, description="...and the robust z-score of log(norm) must exceed this.")
    freeze_cap: int = Field(default=64, ge=0, description="While firing, the baseline is frozen for at most this many "
                            "intervals (after that a new level becomes the normal).")


class LossScaleConfig(FrozenStrictModel):
    enabled: bool = True
    floor: float = Field(default=1.0, gt=0, description="An fp16 loss scale below this has collapsed.")
    window_steps: int = Field(default=200, ge=1, description="Steps over which the overflow rate is measured.")
    max_overflow_rate: float = Field(default=0.1, gt=0, le=1, description="Skipped (overflow) steps per step that fire.")
    min_steps: int = Field(default=20, ge=1, description="Steps of history needed before the rate is judged.")


class DeadNeuronsConfig(FrozenStrictModel):
    enabled: bool = True
    probe: str = Field(default="dead_units", description="Probe name prefix: values arrive as '<probe>/<layer>'.")
    max_fraction: float = Field(default=0.3, gt=0, le=1, description="Dead-unit fraction that fires.")
    max_rise: float = Field(default=0.1, gt=0, le=1, description="Rise of the fraction within rise_window_steps that fires.")
    rise_window_steps: int = Field(default=1000, ge=1, description="Window for the rise.")


class AttentionEntropyConfig(FrozenStrictModel):
    enabled: bool = True
    probe: str = Field(default="attn_entropy", description="Probe name prefix: values arrive as '<probe>/<layer>'.")
    floor_nats: float = Field(default=0.1, ge=0, description="Mean attention entropy below this has collapsed.")
    drop_ratio: float = Field(default=0.5, gt=0, lt=1, description="Fire below this x the layer's recent median.")
    window: int = Field(default=8, ge=2, description="Probe evaluations in the reference median.")
    min_history: int = Field(default=3, ge=1, description="Probe evaluations needed before the ratio is judged.")
    freeze_cap: int = Field(default=32, ge=0, description="Probe evaluations the reference stays frozen while firing.")


class RareTokenConfig(FrozenStrictModel):
    enabled: bool = True
    probe: str = Field(default="rare_mass_ratio", description="Probe: predicted / data mass of the rarest tokens.")
    floor: float = Field(default=0.1, gt=0, description="A ratio below this has collapsed.")
    drop_ratio: float = Field(default=0.25, gt=0, lt=1, description="Fire below this x the recent median.")
    window: int = Field(default=8, ge=2, description="Probe evaluations in the reference median.")
    min_history: int = Field(default=3, ge=1, description="Probe evaluations needed before the ratio is judged.")
    freeze_cap: int = Field(default=32, ge=0, description="Probe evaluations the reference stays frozen while firing.")


class TokenDriftConfig(FrozenStrictModel):
    enabled: bool = True
    probe: str = Field(default="token_js", description="Probe: JS divergence (nats) of the data window vs the baseline.")
    max_js: float = Field(default=0.3, gt=0, description="JS divergence that fires whatever the history.")
    z_threshold: float = Field(default=8.0, gt=0, description="Robust z against the recent values that fires...")
    min_ratio: float = Field(default=3.0, gt=1, description="...when the value is also this x the recent median "
                             "(sampling noise and benign batches move it by up to ~2x).")
    window: int = Field(default=16, ge=3, description="Probe evaluations in the reference window.")
    min_history: int = Field(default=4, ge=2, description="Probe evaluations needed before the z-score is judged.")
    sigma_floor_rel: float = Field(default=0.05, ge=0, description="Noise scale floor, as a fraction of the median.")
    freeze_cap: int = Field(default=32, ge=0, description="Probe evaluations the reference stays frozen while firing.")


class ThroughputConfig(FrozenStrictModel):
    enabled: bool = True
    window: int = Field(default=32, ge=3, description="Intervals in the rolling median of tokens/s.")
    min_history: int = Field(default=6, ge=2, description="Intervals needed (after a regime change too).")
    drop_ratio: float = Field(default=0.6, gt=0, lt=1, description="tokens/s below this x the rolling median is low.")
    consecutive: int = Field(default=2, ge=1, description="Low intervals in a row that fire (one slow interval is "
                             "a checkpoint write or a GC pause).")
    sustain_window: int = Field(default=3, ge=1, description="A smaller, lasting fall: over this many recent intervals...")
    sustain_ratio: float = Field(default=0.8, gt=0, lt=1, description="...the median is below this x the rolling median...")
    sustain_ceiling: float = Field(default=0.9, gt=0, le=1, description="...and every one is below this x: a rate that "
                                   "stepped down by a fifth or slides (which the rolling median would follow down), "
                                   "not separate slow intervals (a GC pause, a checkpoint write) with normal ones "
                                   "between them.")
    freeze_cap: int = Field(default=128, ge=0, description="While low, the baseline is frozen for at most this many intervals.")


class StallConfig(FrozenStrictModel):
    enabled: bool = True
    min_s: float = Field(default=120.0, gt=0, description="Never call a trainer stalled before this many seconds of silence.")
    gap_factor: float = Field(default=10.0, gt=1, description="...nor before this x its median gap between metrics.")
    gap_window: int = Field(default=32, ge=2, description="Gaps in the median.")


class KindPolicy(FrozenStrictModel):
    """Severity and recommended action of one alert kind."""

    severity: Severity
    action: RecommendedAction
    resolve_after: int = Field(default=3, ge=1, description="Clear intervals before the resolution is sent.")
    cooldown: int = Field(default=10, ge=0, description="Intervals after a resolution during which the same "
                          "(kind, layer) does not open a new incident (a lingering condition opens one when it ends).")


def _default_policies() -> dict[AlertKind, KindPolicy]:
    # Why these: non-finite values and exploding gradients mean the weights are (about to be)
    # damaged, so restore them; a divergence is usually a too-high LR, so restore and cut it.
    # A collapsing fp16 loss scale keeps skipping steps: a lower LR is the usual cure. Attention
    # entropy collapse precedes divergence and is cured by a lower LR (Zhai et al., 2023).
    # Dead units, rare-token collapse, data drift, stagnation and slowness need a human's
    # judgement: notify. A spike is recorded (most recover by themselves, as in OLMo/llm-foundry);
    # repeated spikes escalate (LossSpikeConfig.repeat_k).
    return {
        "non_finite": KindPolicy(severity="critical", action="rollback", resolve_after=3),
        "grad_explosion": KindPolicy(severity="critical", action="rollback"),
        "divergence": KindPolicy(severity="critical", action="rollback_cut_lr"),
        "loss_spike": KindPolicy(severity="warning", action="record", resolve_after=3, cooldown=0),
        "stagnation": KindPolicy(severity="warning", action="notify", resolve_after=2, cooldown=20),
        "loss_scale_collapse": KindPolicy(severity="critical", action="cut_lr"),
        "dead_neurons": KindPolicy(severity="warning", action="notify", resolve_after=2),
        "attention_entropy_collapse": KindPolicy(severity="warning", action="cut_lr", resolve_after=2),
        "rare_token_collapse": KindPolicy(severity="warning", action="notify", resolve_after=2),
        "token_drift": KindPolicy(severity="warning", action="notify", resolve_after=2),
        "throughput_drop": KindPolicy(severity="warning", action="notify", resolve_after=3),
        "trainer_stalled": KindPolicy(severity="critical", action="notify", resolve_after=1, cooldown=0),
    }


class AlertConfig(FrozenStrictModel):
    policies: dict[AlertKind, KindPolicy] = Field(default_factory=_default_policies)
    escalated_severity: Severity = Field(default="critical", description="Severity of a repeated loss spike.")
    escalated_action: RecommendedAction = Field(default="rollback", description="Action for a repeated loss spike.")
    evidence_values: int = Field(default=16, ge=1, le=256, description="Recent values of the watched series in evidence.")
    resolve_on_run_end: bool = Field(default=True, description="Send resolutions for incidents open when a run ends.")

    @model_validator(mode="after")
    def _complete(self) -> AlertConfig:
        # A partial override (one kind in YAML) keeps the defaults for the others.
        merged = {**_default_policies(), **self.policies}
        object.__setattr__(self, "policies", merged)
        return self


class HealthConfig(FrozenStrictModel):
    """Everything the health monitor can be told; `HealthConfig()` is a sound default."""

    non_finite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    loss_spike: LossSpikeConfig = Field(default_factory=LossSpikeConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    stagnation: StagnationConfig = Field(default_factory=StagnationConfig)
    grad_explosion: GradExplosionConfig = Field(default_factory=GradExplosionConfig)
    loss_scale: LossScaleConfig = Field(default_factory=LossScaleConfig)
    dead_neurons: DeadNeuronsConfig = Field(default_factory=DeadNeuronsConfig)
    attention_entropy: AttentionEntropyConfig = Field(default_factory=AttentionEntropyConfig)
    rare_tokens: RareTokenConfig = Field(default_factory=RareTokenConfig)
    token_drift: TokenDriftConfig = Field(default_factory=TokenDriftConfig)
    throughput: ThroughputConfig = Field(default_factory=ThroughputConfig)
    stall: StallConfig = Field(default_factory=StallConfig)
    alerts: AlertConfig = Field(default_factory=AlertConfig)


def overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid over `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_health_config(deployment: dict[str, Any], run_config: dict[str, Any]) -> HealthConfig:
    """A run's thresholds: the `health:` section of its config file laid over the deployment's
    section (HELOX_CONFIG); a run without one gets the deployment's."""
    return HealthConfig.model_validate(overlay(deployment, section(run_config, "health")))
