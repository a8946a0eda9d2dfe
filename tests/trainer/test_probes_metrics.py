"""Probes, metrics, emitters and the hook points they plug into."""

from __future__ import annotations

import math

import numpy as np
import pytest
import structlog
import torch

from contracts.events import TrainingMetrics
from services.trainer.config import WandbConfig
from services.trainer.control import Command
from services.trainer.data import InMemoryBatchSource
from services.trainer.hooks import Callback, Event, Hooks
from services.trainer.loop import Trainer
from services.trainer.metrics import FunctionEmitter, StructlogEmitter, WandbEmitter, mfu
from services.trainer.probes import ProbeContext, kl_js
from shared.model import Llama, model_preset

from .helpers import DATA_VOCAB, VOCAB, Recorder, make_config

REQUIRED = {"step", "tokens_seen", "loss", "lr", "grad_norm", "grad_norm_per_layer", "loss_scale", "skipped_steps",
            "tokens_per_s", "mfu", "seq_len", "batch_size", "probes", "domain_loss", "val_loss", "data_cursor"}


def test_metrics_carry_every_field_and_probe_values(source, tmp_path):
    seen = []
    cfg = make_config(max_steps=4, log={"every": 2}, probes={"enabled": True, "every": 2, "batch_size": 2})
    Trainer(cfg, source(), tmp_path, callbacks=[FunctionEmitter(seen.append)]).fit()
    assert [m["step"] for m in seen] == [2, 4]
    m = seen[-1]
    assert set(m) >= REQUIRED
    assert m["tokens_per_s"] > 0 and m["mfu"] > 0 and m["loss_scale"] is None and m["skipped_steps"] == 0
    assert set(m["grad_norm_per_layer"]) >= {"layers.0", "layers.3", "embed_tokens"}
    assert set(m["domain_loss"]) == {"code", "prose"}
    p = m["probes"]
    for i in range(4):
        assert 0 < p[f"attn_entropy/layers.{i}"] <= math.log(32) + 1e-4
        assert p[f"act_rms/layers.{i}"] > 0 and 0 <= p[f"dead_units/layers.{i}"] <= 1
    assert 1 < p["ppl"] < 2 * VOCAB
    assert {"rare_mass_pred", "rare_mass_data", "rare_mass_ratio", "token_kl", "token_js"} <= set(p)
    assert any(k.startswith("domain_loss/") for k in p)


def test_every_lr_factor_is_reported_and_their_product_is_the_lr(source, tmp_path):
    seen = []
    cfg = make_config(max_steps=6, log={"every": 1}, optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
                      curriculum={"batch_ramp": [(0, 4), (5, 8)]},
                      faults={"lr_multiply_step": 3, "lr_multiply_factor": 10.0})
    cut = Recorder(at={3: lambda t: t.submit(Command("scale_lr", 0.5))})  # applied before step 4
    Trainer(cfg, source(), tmp_path, callbacks=[FunctionEmitter(seen.append), cut]).fit()
    by_step = {m["step"]: m for m in seen}
    factors = {s: (m["lr_schedule"], m["lr_curriculum"], m["lr_control"], m["lr_fault"]) for s, m in by_step.items()}
    half = math.sqrt(4 / 8)  # batch 4 against the reference 8
    assert factors[2] == pytest.approx((1e-2, half, 1.0, 1.0))
    assert factors[3] == pytest.approx((1e-2, half, 1.0, 10.0))
    assert factors[4] == pytest.approx((1e-2, half, 0.5, 10.0))
    assert factors[6] == pytest.approx((1e-2, 1.0, 0.5, 10.0))
    for m in seen:
        assert m["lr"] == pytest.approx(m["lr_schedule"] * m["lr_curriculum"] * m["lr_control"] * m["lr_fault"])
    # They travel on the bus: the contract carries each factor.
    event = TrainingMetrics.model_validate({k: v for k, v in by_step[4].items() if k in TrainingMetrics.model_fields})
    assert (event.lr_schedule, event.lr_curriculum, event.lr_control, event.lr_fault) == pytest.approx(factors[4])


def test_token_drift_is_measured_against_the_baseline(domains, tmp_path):
    code_hist = np.bincount(domains["code"], minlength=VOCAB).astype(float)
    seen = []

    def run(weights, out):
        data = InMemoryBatchSource(domains, seq_len=32, batch_size=4, weights=weights)
        cfg = make_config(max_steps=2, log={"every": 2}, probes={"enabled": True, "every": 2})
        Trainer(cfg, data, out, callbacks=[FunctionEmitter(seen.append)], baseline_histogram=code_hist).fit()
        return seen[-1]["probes"]

    same = run({"code": 1.0, "prose": 0.0}, tmp_path / "a")
    other = run({"code": 0.0, "prose": 1.0}, tmp_path / "b")
    assert same["token_js"] < other["token_js"] and same["token_kl"] < other["token_kl"]
    # Half the vocabulary never occurs in this data: the rare set is the rarest half of the tokens
    # that do, so the ratio is a number, not 0/0.
    assert 0 < same["rare_mass_data"] < 0.5 and math.isfinite(same["rare_mass_ratio"]) and same["rare_mass_ratio"] > 0


def test_probe_context_statistics_on_a_known_model():
    torch.manual_seed(0)
    model = Llama(model_preset("tiny")).eval()
    ids = torch.randint(0, DATA_VOCAB, (3, 16))
    ctx = ProbeContext(model, {"input_ids": ids, "labels": ids.roll(-1, 1)}, 1, ["d"], 0.01, lambda: torch.no_grad())
    cap = ctx.capture()
    assert cap.token_loss.shape == (3, 16)
    assert cap.mean_pred.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert len(cap.attn_entropy) == len(cap.act_rms) == len(cap.dead_units) == 4
    # A freshly initialised model attends almost uniformly: entropy close to the mean of log(t+1).
    uniform = float(torch.log(torch.arange(1, 17, dtype=torch.float)).mean())
    assert cap.attn_entropy["layers.0"] == pytest.approx(uniform, rel=0.05)


def test_kl_and_js_are_zero_for_equal_histograms_and_bounded():
    p = torch.tensor([1.0, 2.0, 3.0])
    assert kl_js(p, p * 5) == pytest.approx((0.0, 0.0), abs=1e-9)
    _, js = kl_js(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert js == pytest.approx(math.log(2), rel=1e-3)


def test_every_named_hook_point_fires(source, tmp_path):
    fired = []

    class Spy(Callback):
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda trainer, **kw: fired.append(name[3:])
            raise AttributeError(name)

    cfg = make_config(max_steps=2, log={"every": 2}, probes={"enabled": True, "every": 2}, eval={"every": 2, "batches": 1},
                      checkpoint={"every": 2})
    trainer = Trainer(cfg, source(), tmp_path, callbacks=[Spy()], val_data=source(seed=5))
    trainer.submit(Command("checkpoint"))
    trainer.fit()
    assert set(fired) == {e.value for e in Event}
    assert fired[0] == "train_start" and fired[-1] == "train_end"


def test_hooks_accept_plain_functions_and_refuse_duplicate_names():
    hooks = Hooks()
    calls = []
    hooks.on("log", lambda trainer, metrics: calls.append(metrics["step"]))
    hooks.fire(Event.LOG, None, metrics={"step": 3})
    assert calls == [3]

    class Named(Callback):
        name = "x"

    hooks.add(Named())
    with pytest.raises(ValueError, match="unique"):
        hooks.add(Named())


def test_structlog_emitter_writes_one_flat_line_per_interval():
    with structlog.testing.capture_logs() as logs:
        StructlogEmitter().on_log(None, {"step": 2, "loss": 1.5, "grad_norm_per_layer": {"layers.0": 0.1}})
    assert logs[0]["event"] == "train.metrics" and logs[0]["grad_norm_per_layer.layers.0"] == 0.1


def test_wandb_emitter_logs_offline_by_default(tmp_path):
    pytest.importorskip("wandb")
    assert WandbConfig().mode == "offline"
    em = WandbEmitter(WandbConfig(), tmp_path, {"lr": 1e-3})
    em.on_log(None, {"step": 5, "loss": 2.0, "probes": {"ppl": 7.0}, "mfu": None})
    em.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_mfu_uses_6n_plus_attention_flops():
    cfg = model_preset("tiny")
    n = cfg.num_params(exclude_embedding=True)
    assert cfg.flops_per_token(64) == 6 * n + 12 * 4 * 4 * 32 * 64
    assert mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)
    assert mfu(1000.0, 1e6, None) is None
