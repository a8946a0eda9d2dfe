"""Synthetic, labelled TrainingMetrics traces with planted incidents of every alert kind.

A trace is what the monitor would receive from one run: (received_at, TrainingMetrics)
pairs in arrival order, plus labels saying where each planted incident is. Clean parts
look like a real run, so that the detectors are judged on what they must ignore as much
as on what they must catch:

- loss: L_inf + A (1 + step/tau)^-alpha, multiplicative white + AR(1) noise, and benign
  single-interval blips of 2.5-5 sigma (a hard batch; planted spikes are 12-40 sigma
  and at least +10%);
- LR: linear warm-up then cosine decay; grad norm: decaying power law, lognormal noise,
  benign x1.5-3 blips (global) and x2-4 blips (one layer);
- fp16 runs: a GradScaler-like loss scale (initial calibration skips, an overflow every
  ~1500 steps, doubling every 2000 clean steps);
- tokens/s: noisy, benign single-interval dips (checkpoint writes), and level shifts when
  the curriculum doubles the sequence length or the batch;
- probes every few intervals: per-layer dead-unit fraction and attention entropy (slowly
  specialising), rare-token mass ratio (falling towards ~1), token JS drift (sampling noise,
  benign x1.5 blips); val_loss every few tens of intervals;
- arrival jitter (an interval now and then 3x slower) and, after some critical incidents,
  a rollback: the step goes back to the last checkpoint and training resumes from there.

Labels are indices into the trace (interval numbers, unambiguous across rollbacks):
`start` is the first interval whose metrics show the incident, `end` the last; `also`
lists the kinds that may legitimately fire with it (a divergence also spikes the loss and
the grad norm). `trainer_stalled` labels the interval before the silence.

JSONL format (`write_jsonl` / `read_jsonl`), one JSON object per line:
    {"type": "header", "name", "run_id", "seed", "log_every", "interval_s", "precision",
     "end_time", "finished", "incidents": [{"kind", "start", "end", "layer", "also", "detail"}]}
    {"type": "metrics", "received_at": <unix s>, "payload": <TrainingMetrics JSON>}
Non-finite floats travel as the strings "NaN"/"Infinity", as on the bus.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.events import HealthAlert, TrainingMetrics
from services.health_monitor.config import ALERT_KINDS
from services.health_monitor.monitor import HealthMonitor

DOMAINS = ("web", "code", "books")
FP16_ONLY = ("loss_scale_collapse",)
PROBE_KINDS = ("dead_neurons", "attention_entropy_collapse", "rare_token_collapse", "token_drift")  # ordered: seeded draws
ROLLBACK_KINDS = ("non_finite", "divergence", "grad_explosion", "loss_scale_collapse")

_ALSO: dict[str, tuple[str, ...]] = {
    "non_finite": ("loss_spike", "divergence", "grad_explosion"),
    "loss_spike": ("grad_explosion",),
    "divergence": ("loss_spike", "grad_explosion", "non_finite"),
    "grad_explosion": ("loss_spike", "divergence"),
    "trainer_stalled": ("throughput_drop",),
}


class TraceFormatError(ValueError):
    """A JSONL trace file that does not follow the labelled format (see the module doc)."""


@dataclass
class Label:
    kind: str
    start: int
    end: int
    layer: str | None = None
    also: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "start": self.start, "end": self.end, "layer": self.layer,
                "also": list(self.also), "detail": self.detail}


@dataclass
class Trace:
    name: str
    run_id: str
    seed: int
    log_every: int
    interval_s: float
    precision: str
    events: list[tuple[float, TrainingMetrics]]
    incidents: list[Label]
    end_time: float
    finished: bool

    def write_jsonl(self, path: str | Path) -> None:
        header = {"type": "header", "name": self.name, "run_id": self.run_id, "seed": self.seed,
                  "log_every": self.log_every, "interval_s": self.interval_s, "precision": self.precision,
                  "end_time": self.end_time, "finished": self.finished,
                  "incidents": [x.to_json() for x in self.incidents]}
        with open(path, "w") as fh:
            fh.write(json.dumps(header) + "\n")
            fh.writelines(f'{{"type": "metrics", "received_at": {t!r}, "payload": {m.model_dump_json()}}}\n'
                          for t, m in self.events)


def read_jsonl(path: str | Path) -> Trace:
    """Load a labelled trace written by `Trace.write_jsonl` (or recorded from a real run)."""
    header: dict[str, Any] | None = None
    events: list[tuple[float, TrainingMetrics]] = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{path}:{n}: not JSON ({exc})") from exc
            if rec.get("type") == "header":
                header = rec
            elif rec.get("type") == "metrics":
                events.append((float(rec["received_at"]), TrainingMetrics.model_validate(rec["payload"])))
            else:
                raise TraceFormatError(f"{path}:{n}: unknown record type {rec.get('type')!r} (header or metrics)")
    if header is None:
        raise TraceFormatError(f"{path}: no header line (type=header) with the incident labels")
    labels = [Label(x["kind"], int(x["start"]), int(x["end"]), x.get("layer"), tuple(x.get("also", ())),
                    x.get("detail", {})) for x in header.get("incidents", [])]
    for lab in labels:
        if lab.kind not in ALERT_KINDS:
            raise TraceFormatError(f"{path}: unknown incident kind {lab.kind!r}")
    end_time = float(header.get("end_time", events[-1][0] if events else 0.0))
    return Trace(header.get("name", Path(path).stem), header.get("run_id", Path(path).stem), int(header.get("seed", 0)),
                 int(header.get("log_every", 1)), float(header.get("interval_s", 1.0)), header.get("precision", "bf16"),
                 events, labels, end_time, bool(header.get("finished", True)))


# --- generation ------------------------------------------------------------------------------


@dataclass
class _Plan:
    kind: str
    start: int
    length: int
    layer: str | None = None
    rollback: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


def _place(rng: np.random.Generator, kinds: list[str], n: int, lengths: dict[str, int], probe_every: int,
           warmup: int, gap: int, placed: list[tuple[int, int, str]]) -> list[tuple[str, int]]:
    """Non-overlapping start indices, `gap` clean intervals apart, after the warm-up."""
    for kind in kinds:
        for _ in range(200):
            s = int(rng.integers(warmup, max(warmup + 1, n - lengths[kind] // 2)))
            if kind in PROBE_KINDS:
                s -= s % probe_every  # visible from the first probe at or after it
            e = s + lengths[kind]
            if all(e + gap < a or s > b + gap for a, b, _ in placed):
                placed.append((s, e, kind))
                break
    return sorted(((k, s) for s, _, k in placed), key=lambda x: x[1])


def _label(p: _Plan, end: int) -> Label:
    layer = p.layer if p.kind in ("dead_neurons", "attention_entropy_collapse", "grad_explosion") else None
    return Label(p.kind, p.start, end, layer, _ALSO.get(p.kind, ()), dict(p.detail))


def make_trace(seed: int, kinds: list[str] | None = None, *, n_intervals: int | None = None,
               clean: bool = False, precision: str | None = None) -> Trace:
    """One synthetic run; `kinds` to plant (default: a random 5-7 of those its precision allows).

    `precision` ('bf16' or 'fp16') overrides the seed's draw; only fp16 runs can plant
    loss_scale_collapse.
    """
    rng = np.random.default_rng(seed)
    log_every = int(rng.choice([10, 20, 50]))
    n = int(n_intervals or rng.integers(1500, 2500))
    interval_s = float(rng.uniform(2.0, 20.0))
    drawn = "fp16" if rng.random() < 0.35 else "bf16"
    precision = precision or drawn
    n_layers = int(rng.choice([4, 8, 12, 24]))
    layers = [f"layers.{i}" for i in range(n_layers)]
    groups = ["embed_tokens", *layers, "norm", "lm_head"]
    probe_every = int(rng.choice([5, 10]))
    eval_every = int(rng.choice([20, 50]))
    total_steps = n * log_every

    # The clean run's shape.
    L_inf, A = rng.uniform(1.5, 3.0), rng.uniform(4.0, 8.0)
    tau, alpha = rng.uniform(200, 2000), rng.uniform(0.3, 0.6)
    sigma, rho = rng.uniform(0.003, 0.02), rng.uniform(0.0, 0.6)
    # Blips and spikes are sized against the one-interval innovation of the noise (what a
    # detector can see interval to interval), not its marginal spread.
    innov = sigma * math.sqrt(0.36 + 0.64 * (1 - rho * rho))
    lr_max, warm = rng.uniform(1e-4, 1e-3), int(0.02 * total_steps) + 1
    g_inf, g0, g_sigma = rng.uniform(0.2, 1.0), rng.uniform(2.0, 10.0), rng.uniform(0.08, 0.25)
    layer_w = rng.dirichlet(np.ones(len(groups)) * 2.0)
    tps0 = rng.uniform(2e4, 2e5)
    seq_len, batch = int(rng.choice([256, 512])), int(rng.choice([32, 64, 128]))
    seq_switch, batch_switch = int(0.4 * n), int(0.7 * n)
    dead0 = rng.uniform(0.0, 0.08, n_layers)
    ent_inf = rng.uniform(1.0, 3.0, n_layers)
    ent0 = math.log(seq_len) * 0.8
    tau_e, tau_r = rng.uniform(1000, 5000), rng.uniform(500, 3000)
    rare_inf = rng.uniform(0.6, 1.3)
    js0 = rng.uniform(0.01, 0.05)
    dom_off = dict(zip(DOMAINS, rng.uniform(-0.3, 0.4, len(DOMAINS)), strict=True))
    ckpt_every = int(rng.choice([10, 25]))  # intervals between checkpoints (rollback targets)

    allowed = [k for k in ALERT_KINDS if precision == "fp16" or k not in FP16_ONLY]
    if clean:
        kinds = []
    elif kinds is None:
        kinds = [str(k) for k in rng.permutation(allowed)[: int(rng.integers(5, 8))]]
    else:
        kinds = [k for k in kinds if k in allowed]

    lengths = {
        "non_finite": int(rng.integers(1, 4)), "loss_spike": int(rng.integers(1, 3)),
        "divergence": int(rng.integers(6, 26)), "grad_explosion": int(rng.integers(1, 5)),
        "loss_scale_collapse": int(rng.integers(3, 11)), "throughput_drop": int(rng.integers(4, 31)),
        "trainer_stalled": 1,
        **{k: probe_every * int(rng.integers(3, 11)) for k in PROBE_KINDS},
    }
    warmup = max(80, n // 15)
    placed: list[tuple[int, int, str]] = []
    if "stagnation" in kinds:
        # A plateau long relative to the run (what a person would call stagnation): 25-50% of the
        # steps so far, at least 4000 steps and 200 log intervals. Placed first, sized from its start.
        s0 = int(rng.integers(warmup, int(0.6 * n)))
        lengths["stagnation"] = int(max(4000, 200 * log_every, rng.uniform(0.25, 0.5) * s0 * log_every)) // log_every
        placed.append((s0, s0 + lengths["stagnation"], "stagnation"))
    plans: list[_Plan] = []
    others = [k for k in kinds if k != "stagnation"]
    for kind, start in _place(rng, others, n, lengths, probe_every, warmup, 40, placed):
        p = _Plan(kind, start, lengths[kind])
        if kind in {"dead_neurons", "attention_entropy_collapse"}:
            p.layer = str(rng.choice(layers))
        if kind == "grad_explosion" and rng.random() < 0.6:
            p.layer = str(rng.choice(groups))
        # A divergence never heals by itself: the trainer rolls it back (so does a collapsed
        # loss scale); after a non-finite step or an explosion it may carry on.
        p.rollback = kind in ROLLBACK_KINDS and (kind in ("divergence", "loss_scale_collapse") or rng.random() < 0.5)
        plans.append(p)
    by_start = {p.start: p for p in plans}

    events: list[tuple[float, TrainingMetrics]] = []
    labels: list[Label] = []
    t = 1.7e9 + seed * 1e6
    step, pause, last_ckpt = 0, 0, 0
    ar = 0.0
    scale, skipped, clean_since = 2.0 ** 16, 0, 0
    scale_eq = 2.0 ** float(rng.uniform(8, 16))  # the scale at which overflows start to happen
    if precision == "fp16":
        k0 = int(rng.integers(3, 9))  # GradScaler calibration: the first steps overflow
        scale, skipped = 2.0 ** (16 - k0), k0
    probes: dict[str, float] = {}
    dead = dead0.copy()
    active: _Plan | None = None
    a_end = -1
    plateau_level: float | None = None
    resume_step: int | None = None
    val_loss: float | None = None
    finished = True

    def clean_loss(s: int) -> float:
        return L_inf + A * (1.0 + max(s - pause, 0) / tau) ** -alpha

    for i in range(n):
        if resume_step is not None:
            step, resume_step = resume_step, None
        step += log_every
        if i in by_start:
            active = by_start[i]
            a_end = i + active.length - 1
            active.detail["step_start"] = step
            if active.kind == "stagnation":
                plateau_level = clean_loss(step)
                active.detail["plateau_steps"] = active.length * log_every
        if i % ckpt_every == 0 and active is None:
            last_ckpt = step
        kind = active.kind if active is not None else None
        gap = interval_s * float(np.exp(rng.normal(0.0, 0.05)))
        if rng.random() < 1 / 150:
            gap *= 3.0  # a slow interval (eval, a long checkpoint write): not a stall
        t += gap

        # Loss.
        ar = rho * ar + math.sqrt(1 - rho * rho) * rng.normal()
        noise = sigma * (0.6 * rng.normal() + 0.8 * ar)
        base = plateau_level if kind == "stagnation" else clean_loss(step)
        if kind == "stagnation":
            pause += log_every  # the power law's clock stops; afterwards it resumes from here
        loss = base * (1.0 + noise)
        if kind is None and rng.random() < 1 / 120:
            loss *= 1.0 + rng.uniform(2.5, 5.0) * innov  # a hard batch
        lr = lr_max * (step / warm if step < warm else
                       0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm)))))
        # Gradients.
        g = (g_inf + g0 * (1.0 + step / tau) ** -0.5) * float(np.exp(rng.normal(0.0, g_sigma)))
        if kind is None and rng.random() < 1 / 200:
            g *= rng.uniform(1.5, 3.0)
        per = {name: g * math.sqrt(w) * float(np.exp(rng.normal(0.0, 0.1))) for name, w in zip(groups, layer_w, strict=True)}
        if kind is None and rng.random() < 1 / 300:
            blip = str(rng.choice(groups))
            per[blip] *= rng.uniform(2.0, 4.0)
        # Throughput and batch geometry.
        cur_seq = seq_len * (2 if i >= seq_switch else 1)
        cur_batch = batch * (2 if i >= batch_switch else 1)
        tps = tps0 * (0.9 if i >= seq_switch else 1.0) * (1.05 if i >= batch_switch else 1.0)
        tps *= float(np.exp(rng.normal(0.0, 0.03)))
        near_ckpt = i % ckpt_every in (ckpt_every - 1, 0, 1)
        if kind is None and ((i % ckpt_every == 0 and rng.random() < 0.5) or (not near_ckpt and rng.random() < 1 / 500)):
            tps *= rng.uniform(0.3, 0.7)  # one slow interval (a checkpoint write, a GC pause), never two in a row
        # fp16 loss scale.
        if precision == "fp16":
            for _ in range(log_every):
                # Overflows get likelier as the scale grows: the GradScaler settles near scale_eq.
                if rng.random() < min(1.0, scale / scale_eq / 2000):
                    scale, skipped, clean_since = scale / 2, skipped + 1, 0
                else:
                    clean_since += 1
                    if clean_since >= 2000:
                        scale, clean_since = scale * 2, 0

        # Planted incidents.
        k_in = i - active.start if active is not None else 0
        if kind == "non_finite":
            if precision == "bf16" and rng.random() < 0.3:
                g = math.inf
                per[str(rng.choice(groups))] = math.inf
            else:
                loss = math.nan
                g = math.nan
        elif kind == "loss_spike":
            jump = max(0.10, rng.uniform(12.0, 40.0) * innov)
            loss = base * (1.0 + jump)
            g *= rng.uniform(1.5, 4.0)
            per = {k: v * g / max(1e-12, math.sqrt(sum(x * x for x in per.values()))) for k, v in per.items()}
        elif kind == "divergence":
            if "mode" not in active.detail:
                active.detail["mode"] = "runaway" if rng.random() < 0.6 else "jump"
                active.detail["rate"] = float(rng.uniform(0.05, 0.15))
                active.detail["factor"] = float(rng.uniform(1.6, 3.0))
            if active.detail["mode"] == "runaway":
                f = (1.0 + active.detail["rate"]) ** (k_in + 1)
            else:
                f = active.detail["factor"]
            loss *= f
            g *= f ** 2
        elif kind == "grad_explosion":
            if active.layer is not None:
                per[active.layer] *= active.detail.setdefault("mult", float(rng.uniform(20.0, 200.0)))
            else:
                mult = active.detail.setdefault("mult", float(rng.uniform(10.0, 50.0)))
                per = {k: v * mult for k, v in per.items()}
            loss *= rng.uniform(1.0, 1.03)
        elif kind == "loss_scale_collapse":
            if "mode" not in active.detail:
                active.detail["mode"] = "collapse" if rng.random() < 0.5 else "frequent"
                active.detail["scale_before"] = scale
            over = log_every if active.detail["mode"] == "collapse" else int(max(1, rng.uniform(0.2, 0.6) * log_every))
            skipped += over
            scale = max(scale / 2.0 ** over, 2.0 ** -24)
            g = math.inf
        elif kind == "throughput_drop":
            tps *= active.detail.setdefault("factor", float(rng.uniform(0.1, 0.5)))
        elif kind == "trainer_stalled":
            silence = float(rng.uniform(360.0, 1200.0))
            active.detail["silence_s"] = silence
            if rng.random() < 0.3 or i == n - 1:
                active.detail["at_end"] = True
        if kind not in {"grad_explosion"} and math.isfinite(g) and kind != "loss_spike":
            total = math.sqrt(sum(x * x for x in per.values()))
            per = {k: v * g / total for k, v in per.items()}
        if kind == "grad_explosion":
            g = math.sqrt(sum(x * x for x in per.values()))

        # Probes (every probe_every intervals; the trainer reports the latest between runs).
        if i % probe_every == 0:
            dead = np.clip(dead + rng.normal(0.0, 0.002, n_layers), 0.0, 1.0)
            for li, name in enumerate(layers):
                probes[f"dead_units/{name}"] = float(np.clip(dead[li] + rng.normal(0, 0.005), 0, 1))
                ent = ent_inf[li] + (ent0 - ent_inf[li]) * math.exp(-step / tau_e)
                probes[f"attn_entropy/{name}"] = float(ent * math.exp(rng.normal(0, 0.02)))
                probes[f"act_rms/{name}"] = float(1.0 + 0.1 * li + rng.normal(0, 0.01))
            rare = rare_inf + 15.0 * math.exp(-step / tau_r)
            probes["rare_mass_ratio"] = float(rare * math.exp(rng.normal(0, 0.05)))
            js = js0 * math.exp(rng.normal(0, 0.1)) * (1.5 if rng.random() < 1 / 30 else 1.0)
            probes["token_js"] = float(js)
            probes["token_kl"] = float(2.1 * js)
            probes["ppl"] = float(math.exp(min(loss if math.isfinite(loss) else 20.0, 20.0)))
            if kind == "dead_neurons":
                li = layers.index(active.layer)
                target = active.detail.setdefault("target", float(min(0.95, dead[li] + rng.uniform(0.2, 0.8))))
                ramp = min(1.0, (k_in // probe_every + 1) / active.detail.setdefault("ramp", int(rng.integers(1, 3))))
                probes[f"dead_units/{active.layer}"] = float(dead[li] + (target - dead[li]) * ramp)
            elif kind == "attention_entropy_collapse":
                f = active.detail.setdefault("factor", float(rng.uniform(0.02, 0.4)))
                probes[f"attn_entropy/{active.layer}"] *= f
            elif kind == "rare_token_collapse":
                probes["rare_mass_ratio"] *= active.detail.setdefault("factor", float(rng.uniform(0.01, 0.2)))
            elif kind == "token_drift":
                probes["token_js"] = float(js0 * active.detail.setdefault("factor", float(rng.uniform(4.0, 15.0)))
                                           * math.exp(rng.normal(0, 0.1)))
        val_loss = None
        if i % eval_every == eval_every - 1:
            vbase = plateau_level if kind == "stagnation" else clean_loss(step)
            val_loss = float(vbase * (1.0 + 0.02 + (0.1 * sigma + 0.0005) * rng.normal()))
        dl = {d: float(loss + off + 0.5 * sigma * rng.normal()) if math.isfinite(loss) else loss
              for d, off in dom_off.items()}

        m = TrainingMetrics(
            step=step, tokens_seen=step * cur_seq * cur_batch, loss=float(loss), lr=float(lr), grad_norm=float(g),
            grad_norm_per_layer={k: float(v) for k, v in per.items()},
            loss_scale=float(scale) if precision == "fp16" else None, skipped_steps=int(skipped),
            tokens_per_s=float(tps), mfu=float(min(0.6, tps / tps0 * 0.4)), seq_len=cur_seq, batch_size=cur_batch,
            probes=dict(probes), domain_loss=dl, val_loss=val_loss, data_cursor=step * cur_batch,
        )
        events.append((t, m))

        if active is not None and i == a_end:
            if active.rollback:
                resume_step = last_ckpt
                active.detail["rollback_to"] = last_ckpt
            labels.append(_label(active, a_end))
            if active.kind == "trainer_stalled":
                t += active.detail["silence_s"]
                if active.detail.get("at_end"):
                    finished = False
                    active = None
                    break
            if active.kind == "stagnation":
                plateau_level = None
            if active.kind == "loss_scale_collapse":
                scale = active.detail["scale_before"]
            # Probe values go back to normal at the next probe run (rollback or recovery).
            active = None

    if active is not None:  # the trace ends inside an incident
        labels.append(_label(active, n - 1))
    end_time = t if not finished else events[-1][0]
    name = f"synthetic-{seed}"
    return Trace(name, f"run-{seed}", seed, log_every, interval_s, precision, events, labels, end_time, finished)


def make_traces(seeds: list[int], *, clean: bool = False) -> list[Trace]:
    """One trace per seed (incidents of random kinds; every kind appears across ~10 seeds)."""
    return [make_trace(s, clean=clean) for s in seeds]


# --- playing a trace to a monitor ---------------------------------------------------------------


@dataclass
class Fired:
    """An alert the monitor returned, with the trace interval and time it came at."""

    index: int
    time: float
    alert: HealthAlert


@dataclass
class Playback:
    fired: list[Fired]
    observe_s: float  # time spent inside HealthMonitor.observe


def play(trace: Trace, monitor: HealthMonitor, *, tick_s: float = 5.0) -> Playback:
    """Feed a trace to a monitor as the service would: run start, metrics in arrival order
    with `tick(now)` every `tick_s` seconds of trace time in between, ticks until the trace's
    end time, and the run's end when it finished. A tick's alerts are attributed to the last
    interval received before it."""
    run = trace.run_id
    fired: list[Fired] = []
    if not trace.events:
        return Playback(fired, 0.0)
    t0 = trace.events[0][0]
    monitor.run_started(run, at=t0 - trace.interval_s)
    next_tick = t0
    spent = 0.0
    for i, (t, m) in enumerate(trace.events):
        while next_tick < t:
            fired += [Fired(max(i - 1, 0), next_tick, a) for _, a in monitor.tick(next_tick)]
            next_tick += tick_s
        c0 = time.perf_counter()
        alerts = monitor.observe(run, m, t)
        spent += time.perf_counter() - c0
        fired += [Fired(i, t, a) for a in alerts]
    last = len(trace.events) - 1
    while next_tick <= trace.end_time + tick_s:
        fired += [Fired(last, next_tick, a) for _, a in monitor.tick(next_tick)]
        next_tick += tick_s
    if trace.finished:
        fired += [Fired(last, trace.end_time, a) for a in monitor.run_finished(run)]
    return Playback(fired, spent)
