"""The evaluate chart: the axis follows the data, intervals where lm-eval gave a stderr, no empty panels."""
from __future__ import annotations

import pytest

from refinery.tasks.eval.stage import CI_Z, bar_chart, chart_panels, fitted_limits

LABELS = ["pretrain", "finetune", "align"]


def _rows(task, metric, values, stderr=None):
    return [{"model": m, "task": task, "metric": metric, "value": v, "stderr": stderr, "n": 10}
            for m, v in zip(LABELS, values)]


def test_the_axis_fits_close_values_instead_of_starting_at_zero(tmp_path):
    rows = _rows("heldout", "bits_per_byte", [2.1282, 2.1278, 2.1277])
    path = tmp_path / "chart.png"
    (panel,) = bar_chart(rows, LABELS, str(path))
    assert path.stat().st_size > 1000
    lo, hi = panel["ylim"]
    assert 2.12 < lo < 2.1277 and 2.1282 < hi < 2.13      # read back from the axes: no zero baseline
    # the difference fills most of the axis: 0.0005 of a span well under 0.001
    assert (2.1282 - 2.1277) / (hi - lo) > 0.6
    assert panel["values"] == {"pretrain": 2.1282, "finetune": 2.1278, "align": 2.1277}
    assert panel["errorbars"] is False                     # no stderr for held-out rows


def test_intervals_are_drawn_when_the_results_have_a_stderr(tmp_path):
    rows = _rows("mc_local", "acc,none", [0.5, 0.25, 0.3], stderr=0.1)
    rows[2]["stderr"] = None                               # one model without a stderr: its dot only
    (panel,) = bar_chart(rows, LABELS, str(tmp_path / "chart.png"))
    assert panel["errorbars"] is True
    lo, hi = panel["ylim"]
    # the limits take in the whole interval of every model: 0.25 - 1.96 x 0.1 .. 0.5 + 1.96 x 0.1
    assert lo < 0.25 - CI_Z * 0.1 and hi > 0.5 + CI_Z * 0.1
    assert lo > 0.25 - CI_Z * 0.1 - 0.2 and hi < 0.5 + CI_Z * 0.1 + 0.2


def test_panels_without_values_or_with_only_zeros_are_left_out(tmp_path):
    rows = (_rows("mc_local", "acc,none", [0.5, 0.25, 0.3], stderr=0.1)
            + _rows("gsm8k_local", "exact_match,strict-match", [0.0, 0.0, 0.0], stderr=0.0)
            + _rows("gsm8k_local", "exact_match,flexible-extract", [None, None, None])
            + _rows("heldout[lang=en]", "bits_per_byte", [2.0, 2.1, 2.2]))
    drawn, empty = chart_panels(rows, LABELS)
    assert drawn == [("mc_local", "acc,none")]
    assert empty == [("gsm8k_local", "exact_match,strict-match"), ("gsm8k_local", "exact_match,flexible-extract")]
    panels = bar_chart(rows, LABELS, str(tmp_path / "chart.png"))
    assert [(p["task"], p["metric"]) for p in panels] == drawn
    # nothing to draw at all still writes a (captioned) chart
    assert bar_chart(_rows("gsm8k_local", "exact_match,strict-match", [0.0, 0.0, 0.0]), LABELS,
                     str(tmp_path / "empty.png")) == []
    assert (tmp_path / "empty.png").stat().st_size > 1000


def test_fitted_limits():
    assert fitted_limits([1.0, 2.0], [1.0, 2.0]) == pytest.approx((0.88, 2.12))
    lo, hi = fitted_limits([5.0], [5.0])                   # one value: a band around it, not [0, 5]
    assert lo == pytest.approx(4.75) and hi == pytest.approx(5.25)
    lo, hi = fitted_limits([0.0], [0.0])
    assert lo < 0 < hi
