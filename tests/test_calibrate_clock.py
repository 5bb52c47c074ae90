"""Calibration takes its clock as an argument (fusion.costmodel.calibrate): calibrate(cpu_clock=True) passes
the process CPU clock down to every measurement, and no module state is swapped."""
from __future__ import annotations

import time

import torch

from fusion.costmodel import calibrate as cal


def test_best_times_with_the_clock_it_is_given():
    ticks = iter(range(1000))
    best = cal._best(lambda: None, reps=3, inner=1, clock=lambda: float(next(ticks)))
    assert best == 1.0                                 # every timed batch of one call reads one tick apart


def test_cpu_clock_reaches_every_measurement(monkeypatch):
    seen: list = []
    real = cal._best

    def spy(fn, reps, inner=1, budget_s=0.25, clock=cal.WALL):
        seen.append(clock)
        return real(fn, 1, 1, 0.0, clock)              # one batch: the clock matters here, not the numbers

    monkeypatch.setattr(cal, "_best", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hw = cal.calibrate(scale=0.02, cpu_clock=True)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {time.process_time}
    assert "process CPU clock" in hw.source
    assert not hasattr(cal, "_clock")                  # no global clock left to swap
