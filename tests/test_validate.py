"""fusion.analysis.validate: the predicted-vs-measured machinery on a few small programs (--quick, < 60 s).

Timing on shared CI machines is noisy, so the accuracy targets (Spearman >= 0.8, median relative
error <= 30 %, checked by `python -m fusion.analysis.validate` on a quiet machine) are asserted loosely here,
and the run uses ONE thread and the process CPU clock (profile measured the same way), which other
processes cannot inflate: with 2 threads on a loaded machine OpenMP barriers make timings 10-100x off.
"""
from __future__ import annotations

import json
import math

import pytest

from fusion.analysis import validate as V


@pytest.fixture(scope="module")
def quick():
    return V.validate(quick=True, reps=5, threads=1, cpu_clock=True)


def test_quick_rows_are_complete(quick):
    names = {r.program for r in quick.rows}
    assert len(names) >= 3
    assert len(quick.rows) == 3 * len(names)                  # eager, aten, lowered for every program
    for r in quick.rows:
        assert r.way in V.WAYS
        assert math.isfinite(r.predicted_s) and r.predicted_s > 0
        assert math.isfinite(r.measured_s) and r.measured_s > 0 and 0 < r.measured_min_s <= r.measured_s
        assert math.isfinite(r.ratio)
    lowered = [r for r in quick.rows if r.way == "lowered"]
    assert all(r.kernels >= 1 for r in lowered)               # every quick program fuses into a kernel
    eager = [r for r in quick.rows if r.way == "eager"]
    assert all(r.kernels == 0 and r.aten_calls >= 2 for r in eager)


def test_quick_statistics(quick):
    assert math.isfinite(quick.spearman) and -1 <= quick.spearman <= 1
    assert math.isfinite(quick.median_rel_err) and quick.median_rel_err >= 0
    assert quick.spearman >= 0.5, V.format_table(quick)        # loose: CI timing is noisy


def test_fusion_predicted_faster_than_eager(quick):
    """The model must rank the fused program against the eager one the way the measurement does wherever
    the measurement is clear (one below 0.8x the other), and elsewhere predict the fused/eager ratio within
    1.3x of the measured one: at 256x1024 the data sits in cache, fused and eager measure within a few per
    cent of each other (seen both ways round on fresh calibrations: fused 4 % below and 8 % above eager), so
    demanding a fixed winner there would test the calibration's noise, not the model."""
    by = {(r.program, r.way): r for r in quick.rows}
    for prog in {r.program for r in quick.rows}:
        fused, eager = by[(prog, "lowered")], by[(prog, "eager")]
        measured = fused.measured_min_s / eager.measured_min_s
        predicted = fused.predicted_s / eager.predicted_s
        if measured < 0.8:
            assert predicted < 1.0, (prog, measured, predicted)
        elif measured > 1.25:
            assert predicted > 1.0, (prog, measured, predicted)
        else:
            assert abs(math.log(predicted / measured)) <= math.log(1.3), (prog, measured, predicted)


def test_outputs(quick, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "v.png"
    V.plot(quick, str(png))
    assert png.stat().st_size > 1000
    doc = quick.to_json()
    json.dumps(doc)
    assert len(doc["rows"]) == len(quick.rows) and "spearman" in doc
    text = V.format_table(quick)
    assert "Spearman" in text and "predicted" in text


def test_program_list():
    full = V.programs(quick=False)
    assert len(full) * 3 >= 30
    assert {fam for _, fam, _ in full} >= {"softmax", "rmsnorm", "layernorm", "gelu_bias_res", "swiglu",
                                          "masked_softmax", "bert", "llama"}
