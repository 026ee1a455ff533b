"""Tests for the sweep plot (`metric_vs_param`) on small hand-made rows: no training."""

from __future__ import annotations

import itertools
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection

from eglib.plots import PROTOCOLS, metric_vs_param
from eglib.plots.sweeps import metric_column


def _rows() -> list[dict]:
    """Two variants x two tails x three k x two seeds; ASR falls with k, ACC constant."""
    rows = []
    for variant in ("kth", "remove"):
        for tail in (1.0, 0.001):
            for k in (1, 4, 16):
                for seed in (0, 1):
                    row = {"variant": variant, "tail_scale": tail, "k": k, "seed": seed}
                    for p, protocol in enumerate(PROTOCOLS):
                        row[f"asr_{protocol}"] = 0.8 / k + 0.1 * seed + 0.01 * p
                        row[f"acc_{protocol}"] = 0.9
                    rows.append(row)
    return rows


def _main_lines(ax: plt.Axes) -> list:
    """Data lines of a panel (seaborn's lines with markers; not the baseline)."""
    return [ln for ln in ax.get_lines() if ln.get_marker() == "o" and np.size(ln.get_xdata()) > 1]


def test_panels_per_metric_and_protocol_with_mean_lines() -> None:
    fig = metric_vs_param(_rows(), "k", hue="variant", style="tail_scale", logx=True)
    assert len(fig.axes) == 2 * len(PROTOCOLS)  # rows: asr, acc; columns: protocols
    top = fig.axes[: len(PROTOCOLS)]
    assert [ax.get_title() for ax in top] == [
        "per-sample",
        "mixed batches",
        "pure triggered batches",
    ]
    assert "ASR" in fig.axes[0].get_ylabel() and "ACC" in fig.axes[len(PROTOCOLS)].get_ylabel()
    # ACC under the pure protocol is read on all-clean batches, not triggered ones
    assert fig.axes[-1].get_title() == "pure clean batches"
    lines = _main_lines(fig.axes[0])
    assert len(lines) == 4  # 2 variants x 2 tails
    x, y = lines[0].get_xdata(), lines[0].get_ydata()
    np.testing.assert_allclose(x, [1, 4, 16])
    # mean over the two seeds, in %: 100 * (0.8 / k + 0.05)
    np.testing.assert_allclose(y, [100 * (0.8 / k + 0.05) for k in (1, 4, 16)])
    assert fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].collections) >= 4  # one +- std band per line (two seeds)
    assert fig.legends, "one figure legend expected"
    plt.close(fig)


def test_baseline_line_categorical_axis_and_undefined_marks() -> None:
    rows = [
        {"at": "none", "model": "m", "acc": 0.9, "asr": 0.95},
        {"at": "stem", "model": "m", "acc": 0.8, "asr": 0.5},
        {"at": "layer1", "model": "m", "acc": 0.85, "asr": None},  # undefined
        {"at": "layer2", "model": "m", "acc": math.nan, "asr": 0.2},
    ]
    baseline = [{"acc": 0.9, "asr": 0.95}, {"acc": 0.7, "asr": 0.85}]
    fig = metric_vs_param(rows, "at", hue="model", protocols=None, baseline=baseline)
    assert len(fig.axes) == 2  # one panel per metric, no protocols
    asr_ax, acc_ax = fig.axes
    labels = [t.get_text() for t in acc_ax.get_xticklabels()]  # the bottom row shows them
    assert labels == ["none", "stem", "layer1", "layer2"]  # first-seen order, not alphabetical
    dashed = [ln for ln in asr_ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1  # the baseline, at its mean in %
    assert np.asarray(dashed[0].get_ydata())[0] == pytest.approx(90.0)
    marks = [c for c in asr_ax.collections if isinstance(c, PathCollection)]
    undefined = [c for c in marks if c.get_label() == "undefined"]
    assert len(undefined) == 1
    assert np.asarray(undefined[0].get_offsets())[0, 0] == 2.0  # at 'layer1'
    acc_marks = [c for c in acc_ax.collections if c.get_label() == "undefined"]
    assert len(acc_marks) == 1
    assert np.asarray(acc_marks[0].get_offsets())[0, 0] == 3.0  # at 'layer2'
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "undefended" in legend_texts and "undefined" in legend_texts
    plt.close(fig)


def test_explicit_order_and_bad_input() -> None:
    rows = [{"model": "b", "acc": 0.5, "asr": 0.1}, {"model": "a", "acc": 0.6, "asr": 0.2}]
    fig = metric_vs_param(rows, "model", protocols=None, order=["a", "b"])
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["a", "b"]
    assert fig.axes[-1].get_xlabel() == "model" and fig.axes[0].get_xlabel() == ""
    plt.close(fig)
    with pytest.raises(ValueError, match="not in order"):
        metric_vs_param(rows, "model", protocols=None, order=["a"])
    with pytest.raises(ValueError, match="lack keys"):
        metric_vs_param(rows, "k", protocols=None)
    with pytest.raises(ValueError, match="acc_per_sample"):
        metric_vs_param(rows, "model")  # protocol columns absent
    with pytest.raises(ValueError, match="no rows"):
        metric_vs_param([], "k")
    assert metric_column("asr", "mixed") == "asr_mixed" and metric_column("acc", None) == "acc"


def test_long_category_names_do_not_overlap() -> None:
    """The architecture ablation's five model names overlapped level in each panel."""
    models = ("cnn-small", "resnet18", "preact-resnet18", "vgg16", "mobilenetv2")
    rows = [
        {"model": m, "variant": v, f"{metric}_{p}": 0.9}
        for m in models
        for v in ("none", "kth")
        for metric in ("acc", "asr")
        for p in PROTOCOLS
    ]
    rows = [
        {k: v for r in rows if (r["model"], r["variant"]) == key for k, v in r.items()}
        for key in dict.fromkeys((r["model"], r["variant"]) for r in rows)
    ]
    fig = metric_vs_param(rows, "model", hue="variant")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(boxes) in (0, len(models))
        for left, right in itertools.pairwise(boxes):
            assert not left.overlaps(right), (left, right)
    plt.close(fig)
    short = [{"at": s, "acc": 0.9, "asr": 0.5} for s in ("stem", "layer1", "layer2")]
    fig = metric_vs_param(short, "at", protocols=None)
    assert {t.get_rotation() for t in fig.axes[-1].get_xticklabels()} == {0.0}  # short: level
    plt.close(fig)


def test_numpy_numbers_keep_a_numeric_axis_and_logx_refuses_zero() -> None:
    """k given as numpy ints (from a DataFrame) was placed at 0, 1, 2 as categories."""
    rows = [{"k": np.int64(k), "acc": 0.9, "asr": 0.5} for k in (1, 4, 64)]
    fig = metric_vs_param(rows, "k", protocols=None, logx=True)
    assert fig.axes[0].get_xscale() == "log"
    np.testing.assert_allclose(_main_lines(fig.axes[0])[0].get_xdata(), [1, 4, 64])
    plt.close(fig)
    with pytest.raises(ValueError, match=r"logx needs k > 0, got \[0\]"):
        metric_vs_param([*rows, {"k": 0, "acc": 0.9, "asr": 0.5}], "k", protocols=None, logx=True)
