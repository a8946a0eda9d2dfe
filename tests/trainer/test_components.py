"""Unit tests of the loop's components: schedule, curriculum, stability, noise scale, mixing, precision."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from services.trainer.batching import MicroBatchTooLargeError, NoiseScale, find_micro_batch_size
from services.trainer.config import (
    BatchConfig,
    CurriculumConfig,
    MixingConfig,
    NoiseScaleConfig,
    OptimConfig,
    StabilityConfig,
    TrainConfig,
)
from services.trainer.curriculum import BatchPlanError, Curriculum, seq_len_at
from services.trainer.mixing import OnlineDomainMixer, bound_weights
from services.trainer.optim import LRSchedule, build_optimizer, param_groups
from services.trainer.precision import Precision, PrecisionError, resolve_precision
from services.trainer.stability import AdaptiveClipper, GradNorms, StabilityGuard, layer_group
from shared.model import Llama, model_preset

# --- schedule / optimizer -----------------------------------------------------------------


def test_lr_warms_up_linearly_then_follows_the_cosine_to_the_floor():
    s = LRSchedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert s(1) == pytest.approx(0.1) and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_constant_schedule_stays_at_the_peak_after_warmup():
    s = LRSchedule(OptimConfig(lr=2.0, warmup_steps=4, schedule="constant"), max_steps=100)
    assert s(2) == pytest.approx(1.0) and s(50) == 2.0


def test_wsd_holds_the_peak_then_cools_down_in_a_straight_line():
    """warmup 10, decay_steps 110, cooldown 0.4: the peak from step 10 to 66, then linear to 0.1 at 110."""
    s = LRSchedule(OptimConfig(lr=2.0, warmup_steps=10, schedule="wsd", cooldown_fraction=0.4, min_lr_ratio=0.1),
                   max_steps=110)
    assert s(5) == pytest.approx(1.0) and s(10) == pytest.approx(2.0) and s(66) == pytest.approx(2.0)
    assert s(88) == pytest.approx(2.0 * (1 - 0.9 * 0.5))  # half way through the cooldown
    assert s(110) == pytest.approx(0.2) and s(200) == pytest.approx(0.2)
    assert s(67) < 2.0


def test_adamw_decays_matrices_only_and_is_fused_on_cpu():
    m = Llama(model_preset("tiny"))
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] is True


# --- curriculum -----------------------------------------------------------------------------


def test_seq_len_warms_up_from_short_to_full_in_multiples():
    lens = [seq_len_at(s, start=16, end=64, warmup_steps=10, multiple=8) for s in range(1, 13)]
    assert lens[0] == 16 and lens[-1] == 64 and lens[-2] == 64
    assert all(x % 8 == 0 for x in lens) and lens == sorted(lens)


def test_seq_len_warmup_keeps_tokens_per_step_constant():
    c = Curriculum(BatchConfig(global_batch_size=8, micro_batch_size=4, seq_len=64),
                   CurriculumConfig(seq_len_start=16, seq_len_warmup_steps=10), world_size=1, micro_batch=4)
    first, last = c.plan(1), c.plan(20)
    assert first.seq_len == 16 and last.seq_len == 64
    assert first.tokens == last.tokens == 8 * 64
    assert first.accum == last.accum == 2


def test_batch_ramp_scales_the_lr_by_sqrt_of_the_batch_ratio():
    c = Curriculum(BatchConfig(global_batch_size=32, micro_batch_size=8, seq_len=32),
                   CurriculumConfig(batch_ramp=[(0, 8), (10, 16), (20, 32)]), world_size=2, micro_batch=8)
    p1, p2, p3 = c.plan(1), c.plan(10), c.plan(25)
    assert (p1.global_batch, p2.global_batch, p3.global_batch) == (8, 16, 32)
    assert p1.lr_scale == pytest.approx(math.sqrt(8 / 32)) and p3.lr_scale == 1.0
    assert p1.micro_batch * p1.accum * 2 == 8 and p3.micro_batch * p3.accum * 2 == 32


def test_a_batch_that_does_not_split_over_ranks_is_refused():
    with pytest.raises(BatchPlanError, match="multiple of 4"):
        Curriculum(BatchConfig(global_batch_size=10), CurriculumConfig(), world_size=4, micro_batch=2)


# --- adaptive batch ---------------------------------------------------------------------------


def test_micro_batch_probe_backs_off_on_oom():
    tried = []

    def trial(n):
        tried.append(n)
        if n > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert find_micro_batch_size(trial, 32) == 4 and tried == [32, 16, 8, 4]
    with pytest.raises(MicroBatchTooLargeError, match="fsdp"):
        find_micro_batch_size(lambda n: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")), 2)
    with pytest.raises(ValueError):
        find_micro_batch_size(lambda n: (_ for _ in ()).throw(ValueError("bug")), 2)


def test_noise_scale_recovers_a_known_noise_to_signal_ratio():
    # g_B = G + noise/sqrt(B): E|g_B|^2 = |G|^2 + tr(S)/B. With |G|^2 = 1 and tr(S) = 64: B_noise = 64.
    ns = NoiseScale(NoiseScaleConfig(enabled=True, ema=0.0, grow=True, grow_ratio=2.0, min_steps_between=1))
    value = ns.update(1 + 64 / 4, 4, 1 + 64 / 32, 32)
    assert value == pytest.approx(64.0)
    assert ns.should_grow(10, 16) and not ns.should_grow(10, 64)


# --- stability --------------------------------------------------------------------------------


def _model_with_grads(scale=1.0):
    torch.manual_seed(0)
    m = Llama(model_preset("tiny"))
    m(torch.randint(0, 1024, (2, 8))).sum().mul(scale).backward()
    return m


def test_grad_norms_are_global_and_per_layer():
    m = _model_with_grads()
    norms = GradNorms(list(m.named_parameters()))
    total, per_layer = norms.compute()
    ref = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item()
    assert total == pytest.approx(ref, rel=1e-5)
    assert set(per_layer) == {"embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3", "norm"}
    assert math.sqrt(sum(v * v for v in per_layer.values())) == pytest.approx(total, rel=1e-5)
    assert layer_group("module.layers.12.mlp.up_proj.weight") == "layers.12"


def test_clipping_brings_the_global_norm_to_the_threshold():
    m = _model_with_grads(scale=100.0)
    guard = StabilityGuard(StabilityConfig(clip_norm=1.0), GradNorms(list(m.named_parameters())))
    verdict = guard.check_and_clip(loss=1.0)
    assert verdict.applied and verdict.clip_coef < 1
    assert torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item() == pytest.approx(1.0, rel=1e-4)


def test_non_finite_gradients_are_refused_and_counted():
    m = _model_with_grads()
    m.layers[1].mlp.up_proj.weight.grad[0, 0] = float("inf")
    guard = StabilityGuard(StabilityConfig(), GradNorms(list(m.named_parameters())))
    verdict = guard.check_and_clip(loss=2.0)
    assert not verdict.applied and "gradient" in verdict.reason
    assert math.isinf(verdict.per_layer["layers.1"])
    assert not guard.check_and_clip(loss=float("nan")).applied
    assert guard.skipped_steps == 2 and guard.consecutive_skips == 2


def test_adaptive_clip_threshold_follows_recent_norms():
    clipper = AdaptiveClipper(StabilityConfig(adaptive_clip=True, adaptive_min_history=5, adaptive_sigma=2.0,
                                              clip_norm=10.0))
    assert clipper.threshold() == 10.0  # not enough history: the static cap
    for x in [1.0, 1.2, 0.8, 1.1, 0.9]:
        clipper.observe(x)
    t = clipper.threshold()
    assert 1.0 < t < 2.0
    clipper.observe(float("nan"))  # ignored
    assert clipper.threshold() == t


def test_the_guard_clips_at_the_adaptive_threshold_once_it_has_the_history():
    w = nn.Parameter(torch.zeros(2))
    cfg = StabilityConfig(clip_norm=10.0, adaptive_clip=True, adaptive_min_history=5, adaptive_sigma=2.0)
    guard = StabilityGuard(cfg, GradNorms([("w", w)]))
    for norm in [1.0, 1.2, 0.8, 1.1, 0.9]:  # under both thresholds: applied as they are, and remembered
        w.grad = torch.tensor([norm, 0.0])
        verdict = guard.check_and_clip(loss=1.0)
        assert verdict.applied and verdict.clip_threshold == 10.0 and verdict.clip_coef == 1.0
    # Mean 1.0; sample variance (0 + 0.04 + 0.04 + 0.01 + 0.01) / 4 = 0.025: threshold 1 + 2 * sqrt(0.025).
    threshold = 1.0 + 2.0 * math.sqrt(0.025)  # ~1.316
    w.grad = torch.tensor([3.0, 4.0])  # norm 5: under the static cap of 10, over the adaptive threshold
    verdict = guard.check_and_clip(loss=1.0)
    assert verdict.applied and verdict.grad_norm == pytest.approx(5.0)
    assert verdict.clip_threshold == pytest.approx(threshold)
    assert verdict.clip_coef == pytest.approx(threshold / 5.0, rel=1e-5)
    assert w.grad.norm().item() == pytest.approx(threshold, rel=1e-5)
    assert list(guard.adaptive.history)[-1] == pytest.approx(5.0)  # the unclipped norm joins the history


# --- precision --------------------------------------------------------------------------------


def test_cpu_trains_in_fp32_and_refuses_low_precision_with_a_reason():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(PrecisionError, match="30x slower"):
        resolve_precision("bf16", torch.device("cpu"))
    p = Precision("fp32", torch.device("cpu"))
    assert p.loss_scale is None and p.state_dict()["scaler"] is None


def test_fp16_grad_scaler_skips_overflow_and_backs_off():
    p = Precision("fp16", torch.device("cpu"))  # the scaler's logic is device-independent
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    scale0 = p.loss_scale
    p.scale((w * float("inf")).sum()).backward()
    p.unscale_(opt)
    p.update()  # overflow found by unscale_: the step is not applied and the scale backs off
    assert p.loss_scale == scale0 / 2
    assert torch.equal(w.detach(), torch.ones(2))


# --- mixing -----------------------------------------------------------------------------------


def test_weight_bounds_are_respected_and_sum_to_one():
    w = bound_weights(np.array([0.97, 0.02, 0.01]), 0.05, 0.8)
    assert w.sum() == pytest.approx(1.0) and w.min() >= 0.05 - 1e-9 and w.max() <= 0.8 + 1e-9


def test_online_mixing_moves_weight_to_the_domain_with_higher_loss():
    mixer = OnlineDomainMixer(["easy", "hard"], MixingConfig(enabled=True, smoothing=0.5, min_weight=0.05))
    for _ in range(30):
        mixer.observe({"easy": 1.0 * 100, "hard": 5.0 * 100}, {"easy": 100, "hard": 100})
        weights = mixer.update()
    assert weights["hard"] > 0.6 > weights["easy"] >= 0.05
    state = mixer.state_dict()
    clone = OnlineDomainMixer(["easy", "hard"], MixingConfig(enabled=True))
    clone.load_state_dict(state)
    assert clone.as_dict() == mixer.as_dict()


# --- config -----------------------------------------------------------------------------------


def test_train_config_refuses_unknown_keys_and_impossible_lengths():
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(optim={"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="max_seq_len"):
        TrainConfig(model="tiny", batch={"seq_len": 4096})
    cfg = TrainConfig(model="tiny", model_overrides={"vocab_size": 2048})
    assert cfg.model_config_resolved().vocab_size == 2048


def test_train_config_survives_a_json_round_trip():
    cfg = TrainConfig(model=model_preset("tiny"), batch={"global_batch_size": 16},
                      curriculum={"batch_ramp": [(0, 8), (10, 16)]})
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_noise_scale_growth_doubles_the_batch_up_to_the_cap():
    c = Curriculum(BatchConfig(global_batch_size=8, micro_batch_size=4, seq_len=32), CurriculumConfig(),
                   world_size=2, micro_batch=4)
    assert c.grow(5, 2, max_batch=24) == 16 and c.plan(6).global_batch == 16 and c.plan(6).accum == 2
    assert c.plan(6).lr_scale == pytest.approx(math.sqrt(2))
    assert c.grow(6, 2, max_batch=24) == 24 and c.grow(7, 2, max_batch=24) is None
    restored = Curriculum(BatchConfig(global_batch_size=8, micro_batch_size=4, seq_len=32), CurriculumConfig(),
                          world_size=2, micro_batch=4)
    restored.load_state_dict(c.state_dict())
    assert restored.plan(9) == c.plan(9)
