"""Online domain mixing: an EXP3 bandit over domains whose reward is the domain's loss (ODM).

Albalak et al., "Efficient Online Data Mixing For Language Model Pre-Training" (2023):
    eps_t  = min(1/K, sqrt(ln K / (K t)))
    pi_t   = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t
    R_i   <- a R_i + (1 - a) loss_i / pi_{t-1}(i)     (importance-weighted, smoothed)
Domains the model finds hard (high loss) are sampled more. Weights are then kept within
[min_weight, max_weight]. The state (rewards, weights, t) is checkpointed for exact resume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import MixingConfig


def bound_weights(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Project onto {sum 1, lo <= w_i <= hi} by clipping and redistributing (water-filling)."""
    k = len(w)
    lo, hi = min(lo, 1.0 / k), max(hi, 1.0 / k)  # bounds that cannot be met are relaxed
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    for _ in range(100):
        clipped = np.clip(w, lo, hi)
        excess = 1.0 - clipped.sum()
        if abs(excess) < 1e-12:
            return clipped
        free = clipped < hi if excess > 0 else clipped > lo  # who can take (or give) mass
        if not free.any():
            return clipped / clipped.sum()
        clipped[free] += excess * clipped[free] / clipped[free].sum()
        w = clipped
    return w / w.sum()


class OnlineDomainMixer:
    def __init__(self, domains: list[str], cfg: MixingConfig) -> None:
        self.domains, self.cfg = list(domains), cfg
        k = len(self.domains)
        if cfg.initial_weights:
            init = np.array([cfg.initial_weights.get(d, 0.0) for d in self.domains], dtype=np.float64)
        else:
            init = np.full(k, 1.0 / k)
        self.weights = bound_weights(init, cfg.min_weight, cfg.max_weight)
        self.rewards = np.zeros(k)
        self.t = 0
        self._sum = np.zeros(k)
        self._count = np.zeros(k)

    def observe(self, loss_sum: dict[str, float], token_count: dict[str, float]) -> None:
        """Accumulate per-domain summed token losses and token counts from a step."""
        for d, s in loss_sum.items():
            i = self.domains.index(d)
            if math.isfinite(s):
                self._sum[i] += s
                self._count[i] += token_count.get(d, 0.0)

    def update(self) -> dict[str, float]:
        """One bandit round from the losses observed since the last round; returns the new weights."""
        k = len(self.domains)
        self.t += 1
        seen = self._count > 0
        losses = np.where(seen, self._sum / np.maximum(self._count, 1), 0.0)
        a = self.cfg.smoothing
        self.rewards = np.where(seen, a * self.rewards + (1 - a) * losses / self.weights, self.rewards)
        eps_prev = min(1.0 / k, math.sqrt(math.log(k) / (k * max(self.t - 1, 1)))) if k > 1 else 0.0
        eps = min(1.0 / k, math.sqrt(math.log(k) / (k * self.t))) if k > 1 else 0.0
        z = eps_prev * self.rewards
        soft = np.exp(z - z.max())
        soft /= soft.sum()
        pi = (1 - k * eps) * soft + eps
        self.weights = bound_weights(pi, self.cfg.min_weight, self.cfg.max_weight)
        self._sum[:] = 0
        self._count[:] = 0
        return self.as_dict()

    def as_dict(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self.weights, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "rewards": self.rewards.tolist(), "t": self.t,
                "sum": self._sum.tolist(), "count": self._count.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        self.t = int(state["t"])
        self._sum = np.asarray(state.get("sum", np.zeros(len(self.domains))), dtype=np.float64)
        self._count = np.asarray(state.get("count", np.zeros(len(self.domains))), dtype=np.float64)
