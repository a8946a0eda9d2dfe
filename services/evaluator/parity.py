"""Numerical parity of the model in the forms it is run in: batch 1 vs a right-padded batch,
KV-cache decoding vs a full forward, and int8 dynamic quantisation.

There is no train- vs eval-mode check: `shared.model.Llama` has no mode-dependent layer (no
dropout, no batch norm) and the evaluator always rebuilds that class from the checkpoint, so
the two modes give bit-identical logits by construction and such a check could never fail.

Each check returns a flat dict of scalars with `passed` and the numbers behind it (the
`EvaluationCompleted.parity` shape). All run under inference_mode, fp32, on validation text.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import KVCache
from shared.model.agreement import decided_agreement

from .config import ParityConfig

Numbers = dict[str, float | int | str | bool | None]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.inference_mode()
def batch_padding_parity(model: nn.Module, ids: torch.Tensor, tol: float, pad_id: int = 0) -> Numbers:
    """Sequences of different lengths alone (batch 1) vs together, right-padded with an attention mask."""
    model.eval()
    B, T = ids.shape
    lengths = [max(2, T - i * max(1, T // (2 * B))) for i in range(B)]
    batch = torch.full_like(ids, pad_id)
    mask = torch.zeros_like(ids)
    for i, L in enumerate(lengths):
        batch[i, :L] = ids[i, :L]
        mask[i, :L] = 1
    together = model(batch, attention_mask=mask)  # [B, T, V]
    worst = 0.0
    argmax_agree = True
    for i, L in enumerate(lengths):
        alone = model(ids[i:i + 1, :L])[0]  # [L, V]
        worst = max(worst, _max_diff(alone, together[i, :L]))
        argmax_agree &= bool((alone.argmax(-1) == together[i, :L].argmax(-1)).all())
    return {"passed": worst <= tol, "max_abs_diff": worst, "tol": tol, "batch_size": B,
            "min_len": min(lengths), "max_len": max(lengths), "argmax_agree": argmax_agree}


@torch.inference_mode()
def kv_cache_parity(model: nn.Module, ids: torch.Tensor, tol: float) -> Numbers:
    """Prefill half the sequence into a KV cache, decode the rest one token at a time: the logits
    must match one full forward over the sequence."""
    model.eval()
    B, T = ids.shape
    full = model(ids)  # [B, T, V]
    param = next(model.parameters())
    cache = KVCache(model.config, B, T, device=ids.device, dtype=param.dtype)
    half = T // 2
    parts = [model(ids[:, :half], kv_cache=cache)]
    for t in range(half, T):
        parts.append(model(ids[:, t:t + 1], kv_cache=cache))
    cached = torch.cat(parts, dim=1)
    diff = _max_diff(full, cached)
    agree = float((full.argmax(-1) == cached.argmax(-1)).float().mean())
    return {"passed": diff <= tol, "max_abs_diff": diff, "tol": tol, "prefill": half, "decoded": T - half,
            "argmax_agreement": agree}


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:])
    return math.exp(float(nll))


def _timed(fn: Any, *args: Any, repeats: int = 3) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


@torch.inference_mode()
def int8_parity(model: nn.Module, ids: torch.Tensor, *, min_agreement: float, max_ppl_increase: float,
                decided_margin: float = 0.25) -> Numbers:
    """int8 dynamic quantisation of every nn.Linear (weights int8, activations quantised per batch):
    top-1 agreement with fp32 where fp32 made a decision, and the change of perplexity on the same tokens.

    Top-1 agreement is counted at the positions where fp32's top-1 leads its runner-up by at least
    `decided_margin` nats (log-probability). Over all positions it would measure the model's
    indecision as much as the quantisation: any perturbation, however small, flips the argmax of
    a near-tie, and a small model has many (a demo model at ~2 bits/byte puts its top two tokens
    within 5% probability at over a third of positions; int8's flips there cost almost no
    probability). A flip at a decided position changes a choice fp32 actually made. With no
    decided position the agreement is not measurable (None) and perplexity alone judges.
    `top1_agreement_all` is the agreement over every position, for reference; `decided_margin: 0`
    makes the gate use it.
    """
    from torch.ao.quantization import quantize_dynamic

    model.eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not installed); it still works on CPU.
        warnings.simplefilter("ignore")
        qmodel = quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)
        cpu_ids = ids.cpu()  # quantised kernels are CPU-only
        ref, t_fp32 = _timed(model, ids)
        q, t_int8 = _timed(qmodel, cpu_ids)
    ref = ref.cpu().float()
    agreement = decided_agreement(ref, q, decided_margin)
    agree = agreement["top1_agreement"]
    ppl_fp32, ppl_int8 = _ppl(ref, cpu_ids), _ppl(q, cpu_ids)
    rel = ppl_int8 / ppl_fp32 - 1.0
    return {"passed": (agree is None or agree >= min_agreement) and rel <= max_ppl_increase, "top1_agreement": agree,
            "min_agreement": min_agreement, **{k: v for k, v in agreement.items() if k != "top1_agreement"},
            "ppl_fp32": ppl_fp32, "ppl_int8": ppl_int8, "ppl_rel_change": rel,
            "max_ppl_increase": max_ppl_increase, "max_abs_logit_diff": _max_diff(ref, q),
            "fp32_forward_s": t_fp32, "int8_forward_s": t_int8}


def run_parity(model: nn.Module, ids: torch.Tensor, cfg: ParityConfig, *, pad_id: int = 0) -> dict[str, Numbers]:
    """Every enabled check on validation sequences ids [B, T]; a check that raises is reported failed."""
    checks = {
        "batch_padding": lambda: batch_padding_parity(model, ids, cfg.batch_tol, pad_id),
        "kv_cache": lambda: kv_cache_parity(model, ids, cfg.kv_cache_tol),
    }
    if cfg.int8:
        checks["int8_dynamic"] = lambda: int8_parity(model, ids, min_agreement=cfg.int8_min_top1_agreement,
                                                     max_ppl_increase=cfg.int8_max_ppl_increase,
                                                     decided_margin=cfg.int8_decided_margin)
    out: dict[str, Numbers] = {}
    was = model.training
    try:
        for name, check in checks.items():
            try:
                out[name] = check()
            except Exception as exc:  # a broken check is a failed check, with its reason
                out[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        model.train(was)
    return out
