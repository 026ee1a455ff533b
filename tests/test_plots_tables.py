"""Tests for eglib.plots.tables on small hand-made summary rows (no training)."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle

from eglib.plots import tables

NAN = math.nan


def _table() -> list[dict[str, Any]]:
    """2 attacks x 3 defences, means and stds under the three protocols."""
    rows = []
    for i, attack in enumerate(("badnets", "blend")):
        for j, defense in enumerate(("none", "eigenguard", "ss")):
            row: dict[str, Any] = {"attack": attack, "defense": defense, "n": 3}
            for protocol in ("per_sample", "mixed", "pure"):
                row[f"acc_{protocol}"] = 0.9 - 0.01 * j
                row[f"acc_{protocol}_std"] = 0.004
                row[f"asr_{protocol}"] = 0.95 - 0.3 * j - 0.1 * i
                row[f"asr_{protocol}_std"] = 0.02 if j else NAN
            rows.append(row)
    return rows


def _texts(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_mean_std_label() -> None:
    assert tables.mean_std_label(0.9312, 0.0041, scale=100) == "93.1 ± 0.4"
    assert tables.mean_std_label(0.9312, NAN, scale=100) == "93.1"
    assert tables.mean_std_label(0.9312, None, scale=100) == "93.1"
    assert tables.mean_std_label(None) == "-"
    assert tables.mean_std_label(0.734, 0.01, digits=2) == "0.73 ± 0.01"


def test_pivot_orders_fills_and_rejects_duplicates() -> None:
    rows: list[dict[str, Any]] = [
        {"attack": "a", "defense": "x", "v": 1.0},
        {"attack": "b", "defense": "y", "v": 2.0},
        {"attack": "a", "defense": "y", "v": None},
    ]
    grid, ind, cols = tables.pivot(rows, "v", index="attack", columns="defense")
    assert (ind, cols) == (["a", "b"], ["x", "y"])
    assert grid[0, 0] == 1.0 and grid[1, 1] == 2.0
    assert np.isnan(grid[0, 1]) and np.isnan(grid[1, 0])  # None and missing -> NaN
    grid, ind, cols = tables.pivot(
        rows, "v", index=("attack", "defense"), columns="defense", column_order=["y"]
    )
    assert ind == ["a / x", "b / y", "a / y"] and cols == ["y"]
    assert grid[1, 0] == 2.0
    with pytest.raises(ValueError, match="two rows for the cell"):
        tables.pivot([*rows, rows[0]], "v", index="attack", columns="defense")
    with pytest.raises(ValueError, match="lacks the key 'model'"):
        tables.pivot(rows, "v", index="model", columns="defense")
    # numpy scalars (a pandas or numpy aggregate) are numbers: they left blank cells
    typed = [
        {"attack": "a", "defense": "x", "v": np.float32(0.5)},
        {"attack": "a", "defense": "y", "v": np.int64(1)},
    ]
    grid, _, _ = tables.pivot(typed, "v", index="attack", columns="defense")
    assert grid.tolist() == [[0.5, 1.0]]
    with pytest.raises(ValueError, match=r"cell \('a', 'x'\): v='0.5'; expected a number"):
        tables.pivot(
            [{"attack": "a", "defense": "x", "v": "0.5"}], "v", index="attack", columns="defense"
        )


def test_metric_heatmap_annotates_mean_and_std() -> None:
    fig, ax = plt.subplots()
    tables.metric_heatmap(_table(), "asr_per_sample", ax=ax)
    texts = _texts(ax)
    assert len(texts) == 6
    assert "95.0" in texts  # none on badnets: one seed's std is NaN -> mean only
    assert texts == ["95.0", "65.0 ± 2.0", "35.0 ± 2.0", "85.0", "55.0 ± 2.0", "25.0 ± 2.0"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "eigenguard", "ss"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["badnets", "blend"]
    assert "ASR (%), per-sample" in ax.get_title()
    mesh = ax.collections[0]
    assert mesh.get_clim() == (0.0, 100.0)  # fixed scale: colours comparable across figures
    assert np.allclose(np.asarray(mesh.get_array()).reshape(2, 3)[0], [95.0, 65.0, 35.0])
    with pytest.raises(ValueError, match="unknown metric 'loss'"):
        tables.metric_heatmap(_table(), "loss", ax=ax)
    plt.close(fig)


def test_defence_and_protocol_heatmaps_have_one_panel_each() -> None:
    fig = tables.defence_heatmaps(_table(), title="t")
    heat = [ax for ax in fig.axes if ax.texts]
    assert [ax.get_title() for ax in heat] == ["ASR (%), per-sample", "ACC (%), per-sample"]
    assert "88.0 ± 0.4" in _texts(heat[1])
    plt.close(fig)
    fig = tables.protocol_heatmaps(_table())
    titles = [ax.get_title() for ax in fig.axes if ax.texts]
    assert titles == [
        "ASR (%), per-sample",
        "ASR (%), mixed batches",
        "ASR (%), pure triggered batches",
    ]
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown protocol 'batch'"):
        tables.defence_heatmaps(_table(), protocol="batch")
    with pytest.raises(ValueError, match="no rows"):
        tables.protocol_heatmaps([])


def test_detection_heatmaps_rates_as_columns() -> None:
    rows = [
        {
            "attack": "badnets",
            "detector": det,
            "poison_rate": rate,
            "auroc": 0.5 + rate,
            "auroc_std": NAN,
            "tpr": 0.8,
            "tpr_std": 0.1,
            "fpr": 0.1,
            "fpr_std": NAN,
        }
        for det in ("ss", "ac")
        for rate in (0.1, 0.01, 0.05)
    ]
    fig = tables.detection_heatmaps(rows)
    heat = [ax for ax in fig.axes if ax.texts]
    assert len(heat) == 3
    assert [t.get_text() for t in heat[0].get_xticklabels()] == ["1 %", "5 %", "10 %"]
    assert [t.get_text() for t in heat[0].get_yticklabels()] == ["badnets / ss", "badnets / ac"]
    # the same rows in every panel: their labels only once, beside the first (they overlapped
    # the next panel's heat map when every panel carried them)
    assert [ax.yaxis.get_tick_params()["labelleft"] for ax in heat] == [True, False, False]
    fig.canvas.draw()  # the constrained layout: equal heat maps beside the one set of labels
    widths = [ax.get_position().width for ax in heat]
    assert max(widths) - min(widths) < 0.02 * max(widths)
    assert _texts(heat[0])[:3] == ["0.51", "0.55", "0.60"]  # AUROC: 0-1, two digits
    assert _texts(heat[1])[0] == "80.0 ± 10.0"
    assert heat[0].collections[0].get_clim() == (0.0, 1.0)
    plt.close(fig)


def test_trigger_rank_bars_and_adaptive_summary() -> None:
    rows = []
    for attack, diff in (("badnets", 2.0), ("highrank", 20.0)):
        for defense in ("none", "eigenguard"):
            row: dict[str, Any] = {"attack": attack, "defense": defense}
            row.update(erank_clean=40.0, erank_triggered=30.0, erank_diff=diff, erank_diff_std=1.0)
            row.update(acc_per_sample=0.9, asr_per_sample=0.5)
            rows.append(row)
    fig = tables.adaptive_summary(rows, rank_title="ranks")
    bars_ax = fig.axes[0]
    heights = sorted(p.get_height() for p in bars_ax.patches if isinstance(p, Rectangle))
    assert heights == [2.0, 20.0, 30.0, 30.0, 40.0, 40.0]  # 2 attacks x 3 groups
    assert [t.get_text() for t in bars_ax.get_xticklabels()] == ["badnets", "highrank"]
    assert bars_ax.get_title() == "ranks"
    assert len([ax for ax in fig.axes if ax.texts]) == 2  # ASR and ACC heat maps
    plt.close(fig)
    with pytest.raises(ValueError, match="one row per attack"):
        tables.trigger_rank_bars(rows)
    with pytest.raises(ValueError, match="defence 'ft'"):
        tables.adaptive_summary(rows, rank_defense="ft")


def test_formatted_table_labels_and_scales() -> None:
    rows = _table()[:2]
    rows[0]["erank_diff"], rows[0]["erank_diff_std"] = 3.456, 0.5
    shown = tables.formatted_table(rows, ["asr_mixed", "acc_pure", "erank_diff"])
    assert list(shown[0]) == [
        "attack",
        "defense",
        "ASR (%), mixed batches",
        "ACC (%), pure clean batches",
        "erank_diff",
    ]
    assert shown[0]["ASR (%), mixed batches"] == "95.0"
    assert shown[1]["ACC (%), pure clean batches"] == "89.0 ± 0.4"
    assert shown[0]["erank_diff"] == "3.5 ± 0.5" and shown[1]["erank_diff"] == "-"
