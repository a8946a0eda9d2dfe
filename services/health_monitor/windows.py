"""Robust rolling statistics over the metric series the detectors watch.

Every window stores `(step, value)` pairs so that it can be rewound: after a rollback the
trainer resumes from an earlier step, and the values logged on the abandoned timeline
must stop influencing the baselines (`rewind(step)` drops every entry at or after it).

Pure Python on purpose: windows hold tens of values, where sorting a list is cheaper
than a round trip through numpy, and the monitor must process thousands of metrics
events per second on one core.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import pairwise

MAD_TO_SIGMA = 1.4826
"""MAD x this estimates the standard deviation of normally distributed values."""


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    s = sorted(xs)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def mad(xs: Sequence[float], center: float | None = None) -> float:
    """Median absolute deviation around `center` (the median by default)."""
    c = median(xs) if center is None else center
    return median([abs(x - c) for x in xs])


def robust_sigma(xs: Sequence[float]) -> float:
    """A noise scale estimate that ignores outliers: 1.4826 x MAD."""
    return MAD_TO_SIGMA * mad(xs)


def diff_sigma(xs: Sequence[float]) -> float:
    """Noise scale from first differences: 1.4826 x MAD(diff) / sqrt(2).

    Unlike the MAD of the values themselves it is not inflated by a slow trend (a loss
    curve that falls by more than its noise within the window), so a z-score built on it
    stays sensitive early in training.
    """
    if len(xs) < 3:
        return 0.0
    d = [b - a for a, b in pairwise(xs)]
    return MAD_TO_SIGMA * mad(d) / math.sqrt(2.0)


def robust_z(x: float, xs: Sequence[float], floor: float = 0.0) -> tuple[float, float, float]:
    """(z, median, sigma) of `x` against `xs` with sigma = max(1.4826 x MAD, floor)."""
    med = median(xs)
    sigma = max(MAD_TO_SIGMA * mad(xs, med), floor)
    if sigma <= 0.0:
        return (0.0 if x == med else math.copysign(math.inf, x - med)), med, sigma
    return (x - med) / sigma, med, sigma


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation."""
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / n)


def slope(ys: Sequence[float], xs: Sequence[float] | None = None) -> tuple[float, float]:
    """Least-squares slope of ys over xs (0..n-1 by default) and its t-statistic.

    The t-statistic (slope / its standard error) says whether a trend stands out of the
    noise; it is +/-inf for a perfect line and 0 with fewer than 3 points.
    """
    n = len(ys)
    if n < 3:
        return 0.0, 0.0
    xs = range(n) if xs is None else xs
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0.0:
        return 0.0, 0.0
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx)
    if se <= 0.0:
        return b, math.copysign(math.inf, b) if b else 0.0
    return b, b / se


class Window:
    """The last `size` (step, value) pairs of one series."""

    __slots__ = ("_cache", "_pushes", "_steps", "_values", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self._steps: deque[int] = deque(maxlen=size)
        self._values: deque[float] = deque(maxlen=size)
        self._pushes = 0
        self._cache: tuple[int, float, float] | None = None

    def push(self, step: int, value: float) -> None:
        self._steps.append(step)
        self._values.append(value)
        self._pushes += 1

    def rewind(self, step: int) -> None:
        """Forget every entry logged at `step` or later (a rollback abandoned them)."""
        while self._steps and self._steps[-1] >= step:
            self._steps.pop()
            self._values.pop()
            self._cache = None

    def clear(self) -> None:
        self._steps.clear()
        self._values.clear()
        self._cache = None

    def robust(self, refresh: int = 1) -> tuple[float, float]:
        """(median, MAD), recomputed at most every `refresh` pushes once the window holds
        2 x refresh values. The centre and scale of a noise window move slowly, and sorting
        every window on every interval would be most of the monitor's cost."""
        c = self._cache
        if c is None or self._pushes - c[0] >= (refresh if len(self._values) >= 2 * refresh else 1):
            med = median(self._values)
            c = self._cache = (self._pushes, med, mad(self._values, med))
        return c[1], c[2]

    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> list[float]:
        return list(self._values)

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    def last(self, n: int) -> list[float]:
        """The most recent n values (fewer when the window holds fewer)."""
        if n >= len(self._values):
            return list(self._values)
        return list(self._values)[-n:]

    @property
    def latest(self) -> float | None:
        return self._values[-1] if self._values else None

    def median(self) -> float:
        return median(self._values)

    def min(self) -> float:
        return min(self._values)

    def mad(self) -> float:
        return mad(self._values)

    def mean_std(self) -> tuple[float, float]:
        return mean_std(self._values)

    def slope(self) -> tuple[float, float]:
        return slope(list(self._values))

    def stats(self) -> dict[str, float]:
        """Summary for alert evidence: n, median, mad, mean, std, min, max."""
        v = self._values
        if not v:
            return {"n": 0.0}
        med = median(v)
        m, s = mean_std(v)
        return {"n": float(len(v)), "median": med, "mad": mad(v, med), "mean": m, "std": s,
                "min": min(v), "max": max(v)}


class StepWindow:
    """(step, value) pairs covering the last `span` steps (by step number, not by count).

    For quantities defined per step rather than per log interval: overflow rates,
    stagnation over N steps, a dead-unit fraction rising within N steps.
    """

    __slots__ = ("_items", "span")

    def __init__(self, span: int) -> None:
        if span < 1:
            raise ValueError(f"step span must be >= 1, got {span}")
        self.span = span
        self._items: deque[tuple[int, float]] = deque()

    def push(self, step: int, value: float) -> None:
        self._items.append((step, value))
        # Keep one entry at or before (step - span) so that the window always reaches back
        # a full span once enough history exists.
        while len(self._items) >= 2 and self._items[1][0] <= step - self.span:
            self._items.popleft()

    def rewind(self, step: int) -> None:
        while self._items and self._items[-1][0] >= step:
            self._items.pop()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def covered(self) -> int:
        """Steps between the oldest and the newest entry."""
        return self._items[-1][0] - self._items[0][0] if self._items else 0

    @property
    def oldest(self) -> tuple[int, float]:
        return self._items[0]

    @property
    def newest(self) -> tuple[int, float]:
        return self._items[-1]

    @property
    def values(self) -> list[float]:
        return [v for _, v in self._items]

    def items(self) -> list[tuple[int, float]]:
        return list(self._items)


class RunningMin:
    """The minimum of a series so far, rewindable to any earlier step.

    Stored as a monotone stack of (step, new minimum): rewinding pops the minima reached
    at or after the step, so memory grows only with the number of improvements.
    """

    __slots__ = ("_stack",)

    def __init__(self) -> None:
        self._stack: list[tuple[int, float]] = []

    def push(self, step: int, value: float) -> None:
        if not self._stack or value < self._stack[-1][1]:
            self._stack.append((step, value))

    def rewind(self, step: int) -> None:
        while self._stack and self._stack[-1][0] >= step:
            self._stack.pop()

    @property
    def value(self) -> float | None:
        return self._stack[-1][1] if self._stack else None

    @property
    def step(self) -> int | None:
        return self._stack[-1][0] if self._stack else None


class Ewma:
    """Exponentially weighted moving average, rewindable (keeps its recent history)."""

    __slots__ = ("_hist", "alpha")

    def __init__(self, alpha: float, history: int = 256) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"EWMA alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._hist: deque[tuple[int, float]] = deque(maxlen=history)

    def push(self, step: int, value: float) -> float:
        prev = self._hist[-1][1] if self._hist else value
        cur = prev + self.alpha * (value - prev)
        self._hist.append((step, cur))
        return cur

    def rewind(self, step: int) -> None:
        while self._hist and self._hist[-1][0] >= step:
            self._hist.pop()

    @property
    def value(self) -> float | None:
        return self._hist[-1][1] if self._hist else None


def finite(xs: Iterable[float]) -> list[float]:
    """The finite values of xs, in order."""
    return [x for x in xs if math.isfinite(x)]
