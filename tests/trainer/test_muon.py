"""optim.name: muon — Muon on the hidden matrices, AdamW on the rest; one schedule; exact resume."""

from __future__ import annotations

import pydantic
import pytest
import torch

from services.trainer.config import OptimConfig, TrainConfig
from services.trainer.loop import Trainer
from services.trainer.optim import MuonWithAdamW, build_optimizer, set_lr
from shared.checkpoint import list_checkpoints
from shared.model import Llama, model_preset

from .helpers import Recorder, make_config

MUON = {"name": "muon", "lr": 3e-3, "warmup_steps": 2, "muon": {"lr": 0.03}}


def _names(model: torch.nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_embeddings_head_and_norms(tied):
    model = Llama(model_preset("tiny", tie_embeddings=tied))
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    muon = _names(model, [p for g in opt.muon.param_groups for p in g["params"]])
    adamw = _names(model, [p for g in opt.adamw.param_groups for p in g["params"]])
    everything = {n for n, _ in model.named_parameters()}
    assert muon | adamw == everything and not muon & adamw
    assert muon and all(".self_attn." in n or ".mlp." in n for n in muon)
    assert "embed_tokens.weight" in adamw and all("norm" in n or "embed" in n or "lm_head" in n for n in adamw)
    if not tied:
        assert "lm_head.weight" in adamw


def test_the_schedule_sets_both_lrs_and_keeps_muons_ratio():
    model = Llama(model_preset("tiny"))
    opt = build_optimizer(model, OptimConfig(name="muon", lr=2e-3, muon={"lr": 0.02}), torch.device("cpu"))
    set_lr(opt, 1e-3)
    assert {g["lr"] for g in opt.adamw.param_groups} == {1e-3}
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(1e-2)]


def test_muon_is_refused_with_zero_and_fsdp_naming_the_field():
    with pytest.raises(pydantic.ValidationError, match="muon"):
        make_config(optim=MUON, distributed={"strategy": "ddp", "zero": True})
    with pytest.raises(pydantic.ValidationError, match="muon"):
        make_config(optim=MUON, distributed={"strategy": "fsdp"})
    assert TrainConfig().optim.name == "adamw"


def test_muon_run_learns_and_differs_from_adamw(source, tmp_path):
    adamw = Trainer(make_config(max_steps=12), source(), tmp_path / "a").fit()
    muon = Trainer(make_config(max_steps=12, optim=MUON), source(), tmp_path / "m").fit()
    assert muon.losses != adamw.losses
    assert muon.losses[12] < muon.losses[1] - 0.5


def test_muon_stop_and_resume_gives_identical_losses_and_optimizer_state(source, tmp_path):
    cfg = make_config(max_steps=10, optim=MUON, checkpoint={"every": 4})
    straight_trainer = Trainer(cfg, source(), tmp_path / "a")
    straight = straight_trainer.fit().losses
    first = Trainer(cfg, source(), tmp_path / "b", callbacks=[Recorder(at={5: lambda t: t.request_stop()})]).fit()
    assert first.status == "stopped" and first.final_step == 5
    assert [c.step for c in list_checkpoints(tmp_path / "b" / "checkpoints")] == [4, 5]
    resumed = Trainer(cfg, source(), tmp_path / "b")
    second = resumed.fit(resume="latest")
    assert {**first.losses, **second.losses} == straight  # exact equality, not a tolerance
    # Both optimizers' states came back: Muon's momentum buffers and AdamW's moments, bit for bit.
    a, b = straight_trainer.optimizer, resumed.optimizer
    for pa, pb in zip(a.muon.param_groups[0]["params"], b.muon.param_groups[0]["params"], strict=True):
        assert torch.equal(a.muon.state[pa]["momentum_buffer"], b.muon.state[pb]["momentum_buffer"])
    for ga, gb in zip(a.adamw.param_groups, b.adamw.param_groups, strict=True):
        for pa, pb in zip(ga["params"], gb["params"], strict=True):
            assert torch.equal(a.adamw.state[pa]["exp_avg_sq"], b.adamw.state[pb]["exp_avg_sq"])
            assert int(a.adamw.state[pa]["step"]) == int(b.adamw.state[pb]["step"]) == 10


def test_muon_step_0_checkpoint_changes_nothing_and_resumes(source, tmp_path):
    plain = Trainer(make_config(max_steps=6, optim=MUON), source(), tmp_path / "a").fit()
    at_start = Trainer(make_config(max_steps=6, optim=MUON, checkpoint={"at_start": True}), source(), tmp_path / "b")
    assert at_start.fit().losses == plain.losses
    again = Trainer(make_config(max_steps=6, optim=MUON), source(), tmp_path / "c")
    assert again.fit(resume=tmp_path / "b" / "checkpoints" / "step-000000000").losses == plain.losses


def _library_muon_in_fp32(monkeypatch):
    """torch.optim.Muon with its Newton-Schulz iteration run in fp32 (the library casts to bf16)."""
    import torch.optim._muon as lib

    def ns(grad, coefficients, steps, eps):
        a, b, c = coefficients
        x = grad.float()
        if grad.size(0) > grad.size(1):
            x = x.T
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if grad.size(0) > grad.size(1) else x

    monkeypatch.setattr(lib, "_zeropower_via_newtonschulz", ns)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_batched_muon_steps_like_torch_muon(monkeypatch, nesterov, adjust):
    """Same parameters and momentum buffers as torch.optim.Muon after several steps, over matrices of
    three shapes (two of each, wide and tall), with decay: only the layout of the work differs."""
    from services.trainer.muon import BatchedMuon

    _library_muon_in_fp32(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 48), (48, 32), (32, 48), (16, 16), (64, 16), (16, 16)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn=adjust)
    a, b = BatchedMuon(ours, **kw), torch.optim.Muon(theirs, **kw)
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], rtol=0, atol=0)
    # One optimizer's state dict loads into the other (checkpoints from either resume with both).
    b.load_state_dict(a.state_dict())


def test_orthogonalize_flattens_the_spectrum():
    """The quintic leaves singular values near 1 (Keller Jordan's iteration: within about 0.5-1.5),
    from a matrix whose singular values span two orders of magnitude."""
    from services.trainer.muon import orthogonalize

    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(96, 64, generator=gen))
    m = u @ torch.diag(torch.logspace(-1, 1, 64)) @ v.T  # [64, 96]
    (o,) = orthogonalize([m], (3.4445, -4.7750, 2.0315), 5, 1e-7)
    s = torch.linalg.svdvals(o)
    assert o.shape == m.shape and float(s.min()) > 0.5 and float(s.max()) < 1.5
    before = torch.linalg.svdvals(m)
    assert float(before.max() / before.min()) > 99 and float(s.max() / s.min()) < 2
