"""Record labelled health-monitor traces from real training runs with injected faults.

Runs the project's trainer in-process (no Redis, no monitor: nothing acts on the run) on a
small two-domain dataset built like the tests' (`write_corpus` + `make_config` +
`prepare_dataset`), collects the metrics it emits every step (the `log` event, turned into
`contracts.TrainingMetrics` as the bus emitter does), labels the incidents in them and writes
one JSONL trace per run in the format of `tests/health/traces.py`, which
`benchmarks/health.py` scores.

Setup: the `tiny` preset, seq_len 64, batch 8, AdamW lr 2e-3 (10 warm-up steps, cosine over
200 steps whatever the run's length), fp32 on one CPU thread, metrics every step, probes every
10 steps, validation every 50. The control policy records every alert kind instead of acting,
and the loop's own non-finite alarm is off (`max_consecutive_skips` huge): a poisoned run keeps
running, as it would until a monitor noticed.

Runs (faults from `TrainConfig.faults`, each fires once; 120-170 steps):
    clean-seed0, clean-seed1        no fault
    lr-x30-seed0                    LR x30 from step 110 on
    lr-x300-seed1                   LR x300 from step 80 on
    nan-param-seed0                 a NaN written into the first MLP matrix before step 100
    corrupt-batch-seed1, -seed0     step 133 / 67 trains on uniform-noise tokens
    clean-seed2, clean-seed3        no fault
    lr-x30-seed2                    LR x30 from step 100 on
    lr-x100-seed3                   LR x100 from step 120 on
    slowdown-seed2                  every step from step 90 on takes 2.5x as long
    slowdown-seed3                  every step from step 60 on takes 3x as long (120 steps)

Labels are derived from the recorded metrics, not assumed from the fault. A faulty run
shares its seed with a clean run; the two are identical (checked) until the fault, and see
the same batches after it, so the clean run is the counterfactual: what the metrics would
have been without the fault. Per kind (indices are log intervals = step - 1):

    non_finite          every interval with a NaN/Inf loss or gradient norm
    divergence          the loss level (median of 5 intervals) reaches >= 1.5x the clean run's
    loss_spike          otherwise, an interval at >= +10% and >= 12 sigma over the level before
                        it (sigma: the clean run's one-interval relative noise) -- the sizes
                        traces.py plants
    grad_explosion      grad norm >= 10x its pre-fault median, or one layer >= 20x its own
                        (the planted sizes); `layer` names it in the second case
    attention_entropy_collapse, per layer   entropy <= 0.4x the clean run's at the same step
    dead_neurons, per layer                 dead-unit fraction >= 0.2 above the clean run's
    rare_token_collapse <= 0.2x the clean run's;  token_drift  >= 4x the clean run's
    throughput_drop     >= 2 intervals in a row under 0.5x the run's normal tokens/s (the
                        median before the fault, or over a clean run), or >= 5 in a row under
                        0.7x (a lasting fall). A smaller fall (>= 3 intervals in a row under
                        0.85x) is labelled `optional`: the detector's own sizes (0.6x sudden,
                        0.8x lasting) sit between the two, and a firing there is neither a
                        false alarm nor its absence a miss (the scorer leaves it out). Injected by the slowdown
                        fault (every step from k on takes f x as long; the metrics stay the
                        clean run's, which is checked), and also measured where nothing was
                        injected: the recorder shares a small CPU with other work, and after the
                        x300 LR blow-up the model's subnormal floats halve fp32 throughput on a
                        CPU (checked: not with torch.set_flush_denormal(True)). `detail.cause`
                        says 'the injected slowdown', 'environment' or 'after the fault'.

A kind qualifies on those (unambiguous) sizes; its extent is the whole excursion around the
peak at a looser onset (loss 1.1x, grad 3x, entropy 0.75x, dead +0.05, rare 0.6x, drift 2x,
tokens/s 0.85x), from the first interval that shows it to the last, bridging gaps of up to 5
intervals (2 probe evaluations; 2 intervals for tokens/s, whose probe steps are single slow
intervals 10 apart): a monitor is judged on when the excursion began, not on when
it crossed a threshold of the labeller's. `also` follows traces.py (a divergence may also fire
loss_spike and grad_explosion). Natural loss spikes and gradient explosions of those sizes in
any run are labelled too (cause 'natural'); none were seen when these traces were recorded.

The traces are kept small for the repository: floats rounded to 4 significant digits, fields
at their default value left out, and of the probes only those the detectors read
(attn_entropy/*, dead_units/*, rare_mass_ratio, token_js), sent only on the intervals where
they changed (the trainer repeats the latest values in between, which the monitor treats as
no news: the replay is the same). received_at is the real wall-clock arrival time.

Run: python benchmarks/record_traces.py [--out benchmarks/traces] [--only NAME ...]
     (about two minutes on one CPU core; the labels printed as it goes)
     python benchmarks/record_traces.py --relabel   recompute the labels of the recorded traces
     from their metrics, after a change of the rules above (no training)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from contracts.events import TrainingMetrics
from services.data_prep.pipeline import prepare_dataset
from services.health_monitor.config import ALERT_KINDS, HealthConfig
from services.trainer.job import build_trainer, train_config
from services.trainer.metrics import FunctionEmitter
from shared.artifacts import ArtifactStore
from shared.data.manifest import load_manifest
from tests.data_prep.conftest import make_config, write_corpus
from tests.health.traces import _ALSO, Label, Trace, read_jsonl

OUT = Path(__file__).resolve().parent / "traces"
PROBE_EVERY = 10
DECAY_STEPS = 200  # the LR schedule does not depend on a run's length: runs agree step for step
GAP = 5  # intervals bridged inside one excursion
PROBE_GAP = 2  # probe evaluations bridged inside one excursion
THROUGHPUT_NOTE = ("not injected, measured: the recorder shares a small CPU with other work; and after an LR "
                   "blow-up the model computes with subnormal floats, which halves fp32 throughput on this CPU "
                   "(it does not with torch.set_flush_denormal(True))")
_H = HealthConfig()
MONITOR_PROBES = {_H.dead_neurons.probe, _H.attention_entropy.probe, _H.rare_tokens.probe, _H.token_drift.probe}


@dataclass
class RunSpec:
    name: str
    seed: int
    faults: dict[str, Any] = field(default_factory=dict)
    steps: int = 170

    @property
    def fault_step(self) -> int | None:
        steps = [v for k, v in self.faults.items() if k.endswith("_step")]
        return min(steps) if steps else None

    @property
    def fault_desc(self) -> str | None:
        f = self.faults
        if "lr_multiply_step" in f:
            return f"lr_multiply x{f.get('lr_multiply_factor', 100.0):g}"
        if "nan_param_step" in f:
            return "nan_param"
        if "corrupt_batch_step" in f:
            return "corrupt_batch"
        if "slowdown_step" in f:
            return f"slowdown x{f.get('slowdown_factor', 2.0):g}"
        return None

    @property
    def changes_the_model(self) -> bool:
        """False for a fault that only slows the run: its metrics stay the clean run's."""
        return any(k.endswith("_step") and k != "slowdown_step" for k in self.faults)


RUNS = [
    RunSpec("clean-seed0", 0),
    RunSpec("clean-seed1", 1),
    RunSpec("lr-x30-seed0", 0, {"lr_multiply_step": 110, "lr_multiply_factor": 30.0}),
    RunSpec("lr-x300-seed1", 1, {"lr_multiply_step": 80, "lr_multiply_factor": 300.0}),
    RunSpec("nan-param-seed0", 0, {"nan_param_step": 100}, steps=140),
    RunSpec("corrupt-batch-seed1", 1, {"corrupt_batch_step": 133}),
    RunSpec("corrupt-batch-seed0", 0, {"corrupt_batch_step": 67}, steps=130),
    RunSpec("clean-seed2", 2),
    RunSpec("clean-seed3", 3),
    RunSpec("lr-x30-seed2", 2, {"lr_multiply_step": 100, "lr_multiply_factor": 30.0}),
    RunSpec("lr-x100-seed3", 3, {"lr_multiply_step": 120, "lr_multiply_factor": 100.0}),
    RunSpec("slowdown-seed2", 2, {"slowdown_step": 90, "slowdown_factor": 2.5}),
    RunSpec("slowdown-seed3", 3, {"slowdown_step": 60, "slowdown_factor": 3.0}, steps=120),
]


# --- recording -------------------------------------------------------------------------------


def build_dataset(root: Path) -> Path:
    """The tests' two-domain corpus (tinyshakespeare prose + generated Python), prepared."""
    write_corpus(root, n_prose=300, n_code=150)
    return prepare_dataset(make_config(), ArtifactStore(root / "store"), base_dir=root).manifest_path


def train_section(spec: RunSpec) -> dict[str, Any]:
    return {
        "model": "tiny", "max_steps": spec.steps, "seed": spec.seed, "device": "cpu", "precision": "fp32",
        "optim": {"lr": 2e-3, "warmup_steps": 10, "decay_steps": DECAY_STEPS},
        "batch": {"global_batch_size": 8, "micro_batch_size": 8, "seq_len": 64},
        "probes": {"every": PROBE_EVERY},
        "eval": {"every": 50, "batches": 2},
        "checkpoint": {"every": None, "background": False},
        "log": {"every": 1, "structlog": False, "wandb": {"mode": "disabled"}},
        # Nothing may act on the run: the policy records every kind, and the loop's own
        # non-finite alarm never goes off.
        "stability": {"max_consecutive_skips": 10**9},
        "control": {"rules": {k: ["record"] for k in ALERT_KINDS}},
        "faults": spec.faults,
    }


def _round(x: Any, sig: int = 4) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{sig}g}") if math.isfinite(x) and x != 0.0 else x
    if isinstance(x, dict):
        return {k: _round(v, sig) for k, v in x.items()}
    return x


def record(spec: RunSpec, manifest: Path, work: Path) -> tuple[list[tuple[float, TrainingMetrics]], str]:
    """Train one run; the (arrival time, TrainingMetrics) of every log interval, and the precision."""
    vocab = load_manifest(manifest).tokenizer.vocab_size
    cfg = train_config(train_section(spec), vocab_size=vocab, dataset_version=manifest.parent.name)
    events: list[tuple[float, TrainingMetrics]] = []
    last_probes = [""]
    trainer = None

    def emit(metrics: dict[str, Any]) -> None:
        # As the bus emitter builds the event (services/trainer/app.py: BusEmitter.on_log) ...
        fields = {k: v for k, v in metrics.items() if k in TrainingMetrics.model_fields and v is not None}
        fields.setdefault("tokens_seen", trainer.state.tokens)
        fields["data_cursor"] = trainer.data.cursor
        # ... made smaller: the probes the detectors read, and only when they changed.
        fields = _round(fields)
        probes = {k: v for k, v in fields.get("probes", {}).items() if k.split("/", 1)[0] in MONITOR_PROBES}
        fields["probes"] = probes if json.dumps(probes) != last_probes[0] else {}
        last_probes[0] = json.dumps(probes)
        events.append((round(time.time(), 3), TrainingMetrics.model_validate(fields)))

    trainer = build_trainer(cfg, manifest, work / spec.name, run_id=spec.name, callbacks=[FunctionEmitter(emit)])
    result = trainer.fit()
    if result.status != "completed" or result.final_step != spec.steps:
        raise RuntimeError(f"{spec.name}: the run ended {result.status} at step {result.final_step}: {result.reason}")
    return events, trainer.precision.mode


# --- labelling -------------------------------------------------------------------------------


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if _finite(x)]
    return statistics.median(xs) if xs else math.nan


def _excursions(flags: list[int], gap: int) -> list[tuple[int, int]]:
    """Maximal [first, last] runs of the flagged positions, gaps of up to `gap` bridged."""
    out: list[tuple[int, int]] = []
    for i in sorted(flags):
        if out and i - out[-1][1] <= gap + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _around(flags: list[int], peaks: list[int], gap: int) -> list[tuple[int, int]]:
    """The excursions (of the onset flags) that contain a qualifying peak."""
    return [(a, b) for a, b in _excursions(sorted(set(flags) | set(peaks)), gap) if any(a <= p <= b for p in peaks)]


def _same(a: float, b: float) -> bool:
    return a == b or (not _finite(a) and not _finite(b) and (math.isnan(a) == math.isnan(b)))


def _identical(a: TrainingMetrics, b: TrainingMetrics) -> bool:
    if not (_same(a.loss, b.loss) and _same(a.grad_norm, b.grad_norm) and a.lr == b.lr
            and a.skipped_steps == b.skipped_steps and a.probes.keys() == b.probes.keys()):
        return False
    return all(_same(v, b.probes[k]) for k, v in a.probes.items())


def _probe_state(events: list[TrainingMetrics]) -> list[dict[str, float]]:
    """The latest value of every probe at each interval (the traces carry a probe only when it changed)."""
    out, cur = [], {}
    for m in events:
        cur = {**cur, **m.probes}
        out.append(cur)
    return out


class Labeller:
    def __init__(self, spec: RunSpec, events: list[TrainingMetrics], clean: list[TrainingMetrics] | None) -> None:
        self.spec, self.ev, self.clean = spec, events, clean
        self.pv = _probe_state(events)
        self.pc = _probe_state(clean) if clean is not None else None
        self.labels: list[Label] = []
        self.f0 = 0  # first interval that differs from the counterfactual
        if spec.fault_step is not None:
            if clean is None:
                raise ValueError(f"{spec.name}: a faulty run needs the clean run of seed {spec.seed}")
            pairs = enumerate(zip(events, clean, strict=False))
            self.f0 = next((i for i, (a, b) in pairs if not _identical(a, b)), len(events))
            if not spec.changes_the_model:  # a slowdown: same metrics all along, slower from the fault on
                if self.f0 != min(len(events), len(clean)):
                    raise RuntimeError(f"{spec.name}: a slowdown changed the metrics at step {events[self.f0].step}: "
                                       "the runs are not deterministic, the labels would be wrong")
                self.f0 = spec.fault_step - 1
            elif self.f0 != spec.fault_step - 1:
                raise RuntimeError(
                    f"{spec.name}: the run departs from clean-seed{spec.seed} at step {events[self.f0].step}, "
                    f"the fault is at step {spec.fault_step}: the runs are not deterministic, "
                    "the labels would be wrong")

    def add(self, kind: str, span: tuple[int, int], layer: str | None = None, **detail: Any) -> None:
        a, b = span
        if self.spec.fault_desc and detail.get("cause") != "environment":
            detail = {"fault": self.spec.fault_desc, "fault_step": self.spec.fault_step, **detail}
        detail = {"step_start": self.ev[a].step, "step_end": self.ev[b].step, **detail}
        self.labels.append(Label(kind, a, b, layer, _ALSO.get(kind, ()), _round(detail, 4)))

    def covered(self, i: int, kinds: tuple[str, ...]) -> bool:
        return any(lab.kind in kinds and lab.start <= i <= lab.end + GAP for lab in self.labels)

    # The fault's effects, against the counterfactual.

    def non_finite(self) -> None:
        bad = [i for i, m in enumerate(self.ev)
               if not (_finite(m.loss) and _finite(m.grad_norm) and all(map(_finite, m.grad_norm_per_layer.values())))]
        for span in _excursions(bad, GAP):
            cause = {"cause": "natural"} if self.spec.fault_step is None else {}
            self.add("non_finite", span, **cause)

    def loss(self) -> None:
        ev, cl, f0 = self.ev, self.clean, self.f0
        n = len(ev)
        ratio = {i: ev[i].loss / cl[i].loss for i in range(f0, n) if _finite(ev[i].loss) and cl[i].loss > 0}
        level = {i: _median([m.loss for m in ev[i - 4:i + 1]]) / _median([m.loss for m in cl[i - 4:i + 1]])
                 for i in range(max(f0, 4), n) if _finite(ev[i].loss)}
        onset = [i for i, r in ratio.items() if r >= 1.1]
        diverged = [i for i, r in level.items() if r >= 1.5]
        if diverged:
            onset += [i for i, r in level.items() if r >= 1.1]
            for span in _around(onset, diverged, GAP):
                peak = max(level[i] for i in range(span[0], span[1] + 1) if i in level)
                self.add("divergence", span, peak_level_ratio_to_clean=peak, criterion="loss level >= 1.5x clean")
            return
        sigma = self._noise([m.loss for m in cl], f0)
        jumps = {i: ev[i].loss / _median([m.loss for m in ev[max(0, i - 5):i]]) - 1.0 for i in ratio if i >= 5}
        spikes = [i for i, j in jumps.items() if j >= max(0.10, 12 * sigma) and ratio[i] >= 1.1]
        for span in _around(onset, spikes, 0):
            j = max(jumps.get(i, 0.0) for i in range(span[0], span[1] + 1))
            self.add("loss_spike", span, rel_jump=j, sigma=sigma, z=j / sigma,
                     criterion="loss >= +10% and >= 12 sigma over its level")

    @staticmethod
    def _noise(losses: list[float], end: int, window: int = 64) -> float:
        """Robust sigma of the one-interval relative residual loss / median(previous 5) - 1."""
        r = [losses[i] / _median(losses[i - 5:i]) - 1.0 for i in range(max(5, end - window), end)
             if _finite(losses[i])]
        med = _median(r)
        return 1.4826 * _median([abs(x - med) for x in r])

    def grads(self) -> None:
        ev, f0 = self.ev, self.f0
        base = ev[max(0, f0 - 32):f0]
        med = _median([m.grad_norm for m in base])
        layer_med = {k: _median([m.grad_norm_per_layer.get(k, math.nan) for m in base])
                     for k in ev[0].grad_norm_per_layer}
        onset: list[int] = []
        peaks: dict[int, str | None] = {}  # interval -> the layer at fault (None: the global norm)
        for i in range(f0, len(ev)):
            m = ev[i]
            if not _finite(m.grad_norm):
                continue
            g = m.grad_norm / med
            layers = {k: v / layer_med[k] for k, v in m.grad_norm_per_layer.items()
                      if _finite(v) and layer_med.get(k, 0) > 0}
            worst = max(layers, key=layers.get) if layers else None
            if g >= 3 or (worst and layers[worst] >= 3):
                onset.append(i)
            if g >= 10:
                peaks[i] = None
            elif worst and layers[worst] >= 20:
                peaks[i] = worst
        for span in _around(onset, list(peaks), GAP):
            inside = [i for i in peaks if span[0] <= i <= span[1]]
            layer = peaks[inside[0]]
            peak = max(ev[i].grad_norm / med for i in inside)
            self.add("grad_explosion", span, layer, peak_ratio_to_prefault_median=peak,
                     criterion=f"layer {layer} >= 20x its pre-fault median" if layer
                     else "grad norm >= 10x its pre-fault median")

    def probes(self) -> None:
        ev, f0 = self.ev, self.f0
        idx = [i for i in range(f0, len(ev)) if ev[i].step % PROBE_EVERY == 0]
        pos = {i: n for n, i in enumerate(idx)}

        def series(kind: str, names: list[tuple[str, str | None]], score, onset_at, qualify_at) -> None:
            for name, layer in names:
                on, peak, vals = [], [], {}
                for i in idx:
                    a, b = self.pv[i].get(name), self.pc[i].get(name)
                    if not (_finite(a) and _finite(b)):
                        continue
                    s = vals[i] = score(a, b)
                    if onset_at(s):
                        on.append(pos[i])
                    if qualify_at(s):
                        peak.append(pos[i])
                for a, b in _around(on, peak, PROBE_GAP):
                    start, last = idx[a], idx[b]
                    end = idx[b + 1] - 1 if b + 1 < len(idx) else len(ev) - 1
                    worst = (min if kind != "dead_neurons" and kind != "token_drift" else max)(
                        vals[i] for i in idx[a:b + 1] if i in vals)
                    self.add(kind, (start, end), layer, probe=name, worst=worst, last_probe_step=ev[last].step)

        probes = set(self.pv[-1])
        layers = sorted(k.split("/", 1)[1] for k in probes if k.startswith("attn_entropy/"))
        series("attention_entropy_collapse", [(f"attn_entropy/{x}", x) for x in layers],
               lambda a, b: a / b, lambda s: s <= 0.75, lambda s: s <= 0.4)
        layers = sorted(k.split("/", 1)[1] for k in probes if k.startswith("dead_units/"))
        series("dead_neurons", [(f"dead_units/{x}", x) for x in layers],
               lambda a, b: a - b, lambda s: s >= 0.05, lambda s: s >= 0.2)
        series("rare_token_collapse", [("rare_mass_ratio", None)], lambda a, b: a / b,
               lambda s: s <= 0.6, lambda s: s <= 0.2)
        series("token_drift", [("token_js", None)], lambda a, b: a / b, lambda s: s >= 2, lambda s: s >= 4)

    # Whatever happened in any run, fault or not.

    def natural(self) -> None:
        ev = self.ev
        losses = [m.loss for m in ev]
        for i in range(20, len(ev)):
            if not _finite(losses[i]) or self.covered(i, ("loss_spike", "divergence", "non_finite")):
                continue
            sigma = self._noise(losses, i)
            j = losses[i] / _median(losses[i - 5:i]) - 1.0
            if j >= max(0.10, 12 * sigma):
                self.add("loss_spike", (i, i), rel_jump=j, sigma=sigma, cause="natural")
        for i in range(10, len(ev)):
            g = ev[i].grad_norm
            if _finite(g) and not self.covered(i, ("grad_explosion", "non_finite")):
                med = _median([m.grad_norm for m in ev[max(0, i - 32):i]])
                if g >= 10 * med:
                    self.add("grad_explosion", (i, i), ratio=g / med, cause="natural")

    def throughput(self) -> None:
        ev = self.ev
        ref = _median([m.tokens_per_s for m in (ev[:self.f0] if self.spec.fault_step else ev)])
        r = [m.tokens_per_s / ref for m in ev]
        def runs(at: float, n: int) -> list[int]:  # the intervals of every run of >= n in a row at or under `at`
            ends = [i for i in range(n - 1, len(ev)) if max(r[i - n + 1:i + 1]) <= at]
            return sorted({j for i in ends for j in range(i - n + 1, i + 1)})

        peaks = sorted(set(runs(0.5, 2)) | set(runs(0.7, 5)))
        gray = runs(0.85, 3)
        onset = [i for i, x in enumerate(r) if x <= 0.85]
        required = _around(onset, peaks, 2)
        optional = [sp for sp in _around(sorted(set(onset) | set(gray)), gray, 2)
                    if not any(a <= sp[1] and sp[0] <= b for a, b in required)]
        for span, must in [(sp, True) for sp in required] + [(sp, False) for sp in optional]:
            worst = min(r[span[0]:span[1] + 1])
            after = self.spec.fault_step is not None and span[0] >= self.f0
            extra: dict[str, Any] = {} if must else {
                "optional": True, "why": "a smaller or shorter fall than an incident's (2 intervals under 0.5x, "
                                         "or 5 under 0.7x): a detector may call it or not"}
            if after and not self.spec.changes_the_model:
                self.add("throughput_drop", span, cause="the injected slowdown", normal_tokens_per_s=ref,
                         worst_ratio=worst, **extra)
            else:
                self.add("throughput_drop", span, cause="after the fault" if after else "environment",
                         normal_tokens_per_s=ref, worst_ratio=worst, note=THROUGHPUT_NOTE, **extra)

    def run(self) -> list[Label]:
        self.non_finite()
        if self.spec.changes_the_model:
            self.loss()
            self.grads()
            self.probes()
        self.natural()
        self.throughput()
        return sorted(self.labels, key=lambda x: (x.start, x.kind, x.layer or ""))


# --- writing ---------------------------------------------------------------------------------


def write(spec: RunSpec, events: list[tuple[float, TrainingMetrics]], precision: str, labels: list[Label],
          out: Path) -> Path:
    """The labelled JSONL format of traces.py (`Trace.write_jsonl`), payloads without their default values,
    and extra header keys (read_jsonl ignores them) saying where the trace came from."""
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
    trace = Trace(f"recorded-{spec.name}", f"recorded-{spec.name}", spec.seed, 1, round(statistics.median(gaps), 4),
                  precision, events, labels, events[-1][0], True)
    header = {"type": "header", "name": trace.name, "run_id": trace.run_id, "seed": trace.seed,
              "log_every": trace.log_every, "interval_s": trace.interval_s, "precision": trace.precision,
              "end_time": trace.end_time, "finished": trace.finished,
              "incidents": [x.to_json() for x in trace.incidents],
              "source": "recorded by benchmarks/record_traces.py", "fault": spec.faults or None,
              "counterfactual": f"clean-seed{spec.seed}" if spec.fault_step else None, "train": train_section(spec)}
    path = out / f"{spec.name}.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps(header) + "\n")
        fh.writelines(f'{{"type":"metrics","received_at":{t!r},"payload":{m.model_dump_json(exclude_defaults=True)}}}\n'
                      for t, m in trace.events)
    return path


def relabel(specs: list[RunSpec], out: Path) -> None:
    """Recompute the labels of traces already recorded in `out` from their metrics (the labelling
    rules changed, the runs did not): only the header's incidents are rewritten."""
    clean: dict[int, list[TrainingMetrics]] = {}
    for spec in sorted(specs, key=lambda s: s.fault_step is not None):
        path = out / f"{spec.name}.jsonl"
        if not path.exists():
            print(f"{spec.name:22s} not recorded in {out}: skipped")
            continue
        metrics = [m for _, m in read_jsonl(path).events]
        if spec.fault_step is None:
            clean[spec.seed] = metrics
        labels = Labeller(spec, metrics, clean.get(spec.seed)).run()
        lines = path.read_text().splitlines(keepends=True)
        header = json.loads(lines[0])
        before = header["incidents"]
        header["incidents"] = [x.to_json() for x in labels]
        path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
        changed = "unchanged" if before == header["incidents"] else f"{len(before)} -> {len(labels)} labels, changed"
        print(f"{spec.name:22s} {changed}")
        for lab in labels:
            print(f"    {lab.kind:27s} [{lab.start}, {lab.end}]{' ' + lab.layer if lab.layer else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    ap.add_argument("--only", nargs="*", help="record only these runs (their clean counterparts are recorded too)")
    ap.add_argument("--relabel", action="store_true", help="do not train: recompute the labels of the traces "
                    "already in --out from their metrics")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = RUNS
    if args.only:
        wanted = set(args.only) | {f"clean-seed{s.seed}" for s in RUNS if s.name in args.only}
        specs = [s for s in RUNS if s.name in wanted]
    if args.relabel:
        relabel(specs, args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clean: dict[int, list[TrainingMetrics]] = {}
    with tempfile.TemporaryDirectory(prefix="helox-traces-") as tmp:
        work = Path(tmp)
        manifest = build_dataset(work)
        print(f"dataset ready ({time.perf_counter() - t0:.1f} s): vocab {load_manifest(manifest).tokenizer.vocab_size}")
        for spec in sorted(specs, key=lambda s: s.fault_step is not None):  # clean runs first
            c0 = time.perf_counter()
            events, precision = record(spec, manifest, work)
            metrics = [m for _, m in events]
            if spec.fault_step is None:
                clean[spec.seed] = metrics
            labels = Labeller(spec, metrics, clean.get(spec.seed)).run()
            path = write(spec, events, precision, labels, args.out)
            print(f"{spec.name:22s} {len(events)} intervals, {time.perf_counter() - c0:5.1f} s, "
                  f"{path.stat().st_size / 1024:.0f} KiB -> {path}")
            for lab in labels:
                d = lab.detail
                print(f"    {lab.kind:27s} [{lab.start}, {lab.end}] steps {d['step_start']}-{d['step_end']}"
                      f"{' ' + lab.layer if lab.layer else ''}  "
                      + ", ".join(f"{k}={v}" for k, v in d.items()
                                  if k not in ("step_start", "step_end", "fault", "fault_step", "note", "criterion")))
    total = sum(p.stat().st_size for p in args.out.glob("*.jsonl"))
    print(f"done in {time.perf_counter() - t0:.0f} s; {total / 1024:.0f} KiB of traces in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
