"""Rolling statistics: robust centre and scale, trends, and rewinding after a rollback."""

from __future__ import annotations

import math
import random

import pytest

from services.health_monitor.windows import (
    Ewma,
    RunningMin,
    StepWindow,
    Window,
    diff_sigma,
    mad,
    mean_std,
    median,
    robust_sigma,
    robust_z,
    slope,
)


def test_median_and_mad_ignore_an_outlier() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 1000.0]
    assert median(xs) == 3.0 and median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert mad(xs) == 1.0
    z, med, sigma = robust_z(1000.0, xs)
    assert med == 3.0 and sigma == pytest.approx(1.4826) and z > 600


def test_robust_scales_estimate_the_noise_of_gaussian_data() -> None:
    rng = random.Random(1)
    xs = [rng.gauss(0.0, 2.0) for _ in range(4000)]
    assert robust_sigma(xs) == pytest.approx(2.0, rel=0.06)
    assert mean_std(xs)[1] == pytest.approx(2.0, rel=0.05)
    trend = [0.01 * i + x for i, x in enumerate(xs)]  # a trend inflates the MAD, not the differences' MAD
    assert diff_sigma(trend) == pytest.approx(2.0, rel=0.08) and robust_sigma(trend) > 5.0


def test_robust_z_of_a_constant_window() -> None:
    assert robust_z(1.0, [1.0, 1.0])[0] == 0.0
    assert robust_z(2.0, [1.0, 1.0])[0] == math.inf
    assert robust_z(2.0, [1.0, 1.0], floor=0.5)[0] == 2.0


def test_slope_and_its_t_statistic() -> None:
    b, t = slope([1.0, 2.0, 3.0, 4.0])
    assert b == pytest.approx(1.0) and t == math.inf
    rng = random.Random(2)
    noise = [rng.gauss(0, 1) for _ in range(50)]
    assert abs(slope(noise)[1]) < 3
    assert slope([0.2 * i + x for i, x in enumerate(noise)])[1] > 5
    assert slope([1.0, 2.0]) == (0.0, 0.0)


def test_window_keeps_the_last_values_and_rewinds_by_step() -> None:
    w = Window(3)
    for step in (10, 20, 30, 40):
        w.push(step, step / 10)
    assert w.values == [2.0, 3.0, 4.0] and w.steps == [20, 30, 40] and w.latest == 4.0
    w.rewind(30)
    assert w.values == [2.0] and w.last(5) == [2.0]
    with pytest.raises(ValueError, match="window size"):
        Window(0)


def test_window_robust_statistics_are_cached_between_refreshes() -> None:
    w = Window(100)
    for i in range(40):
        w.push(i, float(i))
    med, _ = w.robust(refresh=8)
    w.push(40, 1000.0)
    assert w.robust(refresh=8)[0] == med  # within the refresh period: the cached value
    w.rewind(40)
    w.push(40, 1000.0)
    assert med == 19.5 and w.robust(refresh=8)[0] == 20.0  # a rewind drops the cache


def test_step_window_spans_steps_not_entries() -> None:
    w = StepWindow(100)
    for step in range(0, 500, 10):
        w.push(step, float(step))
    assert w.covered == 100 and w.oldest == (390, 390.0) and w.newest == (490, 490.0)
    w.rewind(450)
    assert w.newest == (440, 440.0)


def test_running_min_rewinds_to_the_minimum_before_a_step() -> None:
    m = RunningMin()
    for step, v in [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0), (5, 2.0)]:
        m.push(step, v)
    assert (m.value, m.step) == (2.0, 5)
    m.rewind(4)
    assert (m.value, m.step) == (4.0, 2)


def test_ewma_smooths_and_rewinds() -> None:
    e = Ewma(0.5)
    assert e.push(1, 2.0) == 2.0 and e.push(2, 4.0) == 3.0 and e.push(3, 4.0) == 3.5
    e.rewind(3)
    assert e.value == 3.0
    with pytest.raises(ValueError, match="alpha"):
        Ewma(0.0)
