"""A keyed, function-preserving watermark in weight space.

The Llama block has exact rescaling symmetries: a hidden unit's input weights can be
multiplied by c and its output weights divided by c without changing the network's function:

- MLP unit j:   up_proj row j * c,  down_proj column j / c   (silu(gate) * up is linear in up)
- V/O unit:     v_proj row (g, d) * c,  o_proj columns (h, d) / c for every query head h of
                kv group g   (attention output is linear in V)
- Q/K unit:     q_proj rows (h, d) and (h, d + D/2) * c for the heads of group g, k_proj rows
                (g, d) and (g, d + D/2) / c   (q.k is unchanged; RoPE rotates the pair
                (d, d + D/2) together, so it commutes with a common scale)

Embedding: the key seeds a PRNG (per layer and family, through HMAC) that draws a sign s = +-1
for every unit; the unit is rescaled by c = exp(s * strength). The log-norm ratio
r = log|in weights| - log|out weights| of each unit moves by 2 * s * strength, while the
logits move only by float rounding, so validation perplexity does not change.

Detection needs only the key and the weights: T = sum(s * r~) where r~ is r centred per
layer and family (the local estimate). For a model that does not carry this key's mark, the
signs are independent of the weights, so conditionally on the weights T is a Rademacher sum
with variance V = sum(r~^2): z = T / sqrt(V) is ~N(0, 1) and Hoeffding bounds the false-positive
probability by exp(-z^2/2) whatever the weights' distribution. fp16 rounding (~5e-4 relative)
and a short fine-tune move r far less than the mark's 2 * strength, so the mark survives both.

Not robust to an adversary who knows the scheme: re-balancing every unit's norms erases it at
no cost. It proves origin for honest copies, conversions and light fine-tunes.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shared.model import ModelConfig

from .provenance import key_bytes, key_id

SCHEME = "helox-rescale/1"
FAMILIES = ("mlp", "vo", "qk")


class WatermarkError(ValueError):
    """The weights do not have the tensors or shapes the watermark needs."""


@dataclass(frozen=True)
class WatermarkResult:
    """Outcome of `detect_watermark`: detected when fp_bound <= the allowed false-positive rate."""

    scheme: str
    key_id: str
    detected: bool
    z: float
    p_value: float  # one-sided normal tail of z
    fp_bound: float  # Hoeffding bound exp(-z^2/2): P(score >= z | weights, key independent of them)
    units: int
    estimated_strength: float  # mean s * r~ / 2, about `strength` for a marked model, about 0 otherwise
    max_false_positive: float

    def as_dict(self) -> dict:
        return asdict(self)


def _signs(key: bytes, family: str, layer: int, n: int) -> np.ndarray:
    seed = hmac.new(key, f"{SCHEME}|{family}|{layer}".encode(), hashlib.sha256).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
    return rng.integers(0, 2, size=n, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def _q_unit_rows(config: ModelConfig) -> np.ndarray:
    """Row indices of q_proj per Q/K unit: [K * D/2, (H/K) * 2] (heads of the group, both halves)."""
    H, K, D = config.n_head, config.n_kv_head, config.head_dim
    rep = H // K
    rows = np.empty((K, D // 2, rep * 2), dtype=np.int64)
    for g in range(K):
        for d in range(D // 2):
            heads = [g * rep + m for m in range(rep)]
            rows[g, d] = [h * D + d for h in heads] + [h * D + d + D // 2 for h in heads]
    return rows.reshape(K * (D // 2), rep * 2)


def _k_unit_rows(config: ModelConfig) -> np.ndarray:
    K, D = config.n_kv_head, config.head_dim
    g, d = np.meshgrid(np.arange(K), np.arange(D // 2), indexing="ij")
    return np.stack([g * D + d, g * D + d + D // 2], axis=-1).reshape(K * (D // 2), 2)


def _o_unit_cols(config: ModelConfig) -> np.ndarray:
    """Columns of o_proj per V/O unit (kv head g, dim d): [K * D, H/K]."""
    H, K, D = config.n_head, config.n_kv_head, config.head_dim
    rep = H // K
    g, d, m = np.meshgrid(np.arange(K), np.arange(D), np.arange(rep), indexing="ij")
    return ((g * rep + m) * D + d).reshape(K * D, rep)


def _get(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return state[name]
    except KeyError:
        raise WatermarkError(f"tensor {name!r} missing: the watermark needs the model's own names "
                             "(shared.model.Llama state dict)") from None


def _log_ratios(state: Mapping[str, torch.Tensor], config: ModelConfig, layer: int, family: str) -> np.ndarray:
    """r = log|in weights| - log|out weights| for every unit of one layer and family."""
    p = f"layers.{layer}."

    def f64(name: str) -> np.ndarray:
        return _get(state, p + name).detach().to("cpu", torch.float64).numpy()

    if family == "mlp":
        up, down = f64("mlp.up_proj.weight"), f64("mlp.down_proj.weight")
        a, b = (up**2).sum(1), (down**2).sum(0)
    elif family == "vo":
        v, o = f64("self_attn.v_proj.weight"), f64("self_attn.o_proj.weight")
        a = (v**2).sum(1)
        b = ((o**2).sum(0))[_o_unit_cols(config)].sum(1)
    else:
        q, k = f64("self_attn.q_proj.weight"), f64("self_attn.k_proj.weight")
        a = ((q**2).sum(1))[_q_unit_rows(config)].sum(1)
        b = ((k**2).sum(1))[_k_unit_rows(config)].sum(1)
    tiny = np.finfo(np.float64).tiny
    return 0.5 * (np.log(np.maximum(a, tiny)) - np.log(np.maximum(b, tiny)))


def embed_watermark(
    state: Mapping[str, torch.Tensor], config: ModelConfig, key: str | bytes, *, strength: float = 0.1
) -> dict[str, torch.Tensor]:
    """A copy of `state` (the model's own names) carrying the key's mark; `state` is not changed."""
    if not 0.0 < strength < 1.0:
        raise ValueError(f"watermark strength must be in (0, 1) (a log-scale factor), got {strength}")
    kb = key_bytes(key)
    out = dict(state)
    for i in range(config.n_layer):
        p = f"layers.{i}."
        names = {n: p + n for n in ("mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight",
                                    "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")}
        w = {n: _get(state, full).detach().clone() for n, full in names.items()}
        dtype = w["mlp.up_proj.weight"].dtype

        def scales(family: str, n: int, layer: int = i, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.from_numpy(np.exp(_signs(kb, family, layer, n) * strength)).to(dtype)

        c = scales("mlp", config.ffn_hidden)
        w["mlp.up_proj.weight"].mul_(c[:, None])
        w["mlp.down_proj.weight"].div_(c[None, :])

        c = scales("vo", config.n_kv_head * config.head_dim)
        w["self_attn.v_proj.weight"].mul_(c[:, None])
        cols = torch.from_numpy(_o_unit_cols(config))  # [units, rep]
        col_scale = torch.ones(config.n_head * config.head_dim, dtype=dtype)
        col_scale[cols.reshape(-1)] = c[:, None].expand_as(cols).reshape(-1)
        w["self_attn.o_proj.weight"].div_(col_scale[None, :])

        c = scales("qk", config.n_kv_head * (config.head_dim // 2))
        q_rows, k_rows = torch.from_numpy(_q_unit_rows(config)), torch.from_numpy(_k_unit_rows(config))
        q_scale = torch.ones(config.n_head * config.head_dim, dtype=dtype)
        q_scale[q_rows.reshape(-1)] = c[:, None].expand_as(q_rows).reshape(-1)
        k_scale = torch.ones(config.n_kv_head * config.head_dim, dtype=dtype)
        k_scale[k_rows.reshape(-1)] = c[:, None].expand_as(k_rows).reshape(-1)
        w["self_attn.q_proj.weight"].mul_(q_scale[:, None])
        w["self_attn.k_proj.weight"].div_(k_scale[:, None])

        for n, full in names.items():
            out[full] = w[n]
    return out


def detect_watermark(
    state: Mapping[str, torch.Tensor], config: ModelConfig, key: str | bytes, *, max_false_positive: float = 1e-6
) -> WatermarkResult:
    """Score the key's mark in `state` (the model's own names, any float dtype)."""
    kb = key_bytes(key)
    t_sum, v_sum, n = 0.0, 0.0, 0
    for i in range(config.n_layer):
        for family in FAMILIES:
            r = _log_ratios(state, config, i, family)
            r = r - r.mean()  # the local estimate: centred per layer and family
            s = _signs(kb, family, i, r.size)
            t_sum += float(s @ r)
            v_sum += float(r @ r)
            n += r.size
    z = t_sum / math.sqrt(v_sum) if v_sum > 0 else 0.0
    p_value = 0.5 * math.erfc(z / math.sqrt(2.0))
    fp_bound = math.exp(-0.5 * z * z) if z > 0 else 1.0
    return WatermarkResult(
        scheme=SCHEME, key_id=key_id(kb), detected=fp_bound <= max_false_positive, z=z, p_value=p_value,
        fp_bound=fp_bound, units=n, estimated_strength=t_sum / n / 2.0 if n else 0.0,
        max_false_positive=max_false_positive,
    )


def derive_watermark_key(signing_key: str | bytes) -> str:
    """The default watermark key: HMAC of a fixed label under the signing key (one secret to manage,
    and the signing key itself never goes into a PRNG)."""
    return hmac.new(key_bytes(signing_key), b"helox-watermark-key/1", hashlib.sha256).hexdigest()
