"""Sweeps and ablations: one metric (ACC, ASR) against one varied parameter, per protocol."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eglib.plots.common import PROTOCOLS, protocol_label, use_style

METRIC_LABELS = {"acc": "clean accuracy ACC (%)", "asr": "attack success rate ASR (%)"}


def _is_missing(value: Any) -> bool:
    """True for None and NaN (an undefined measurement)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_number(value: Any) -> bool:
    """True for real numbers, numpy's included (bools excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def metric_column(metric: str, protocol: str | None) -> str:
    """The row key of a metric under a protocol (`acc_per_sample`), or the bare metric."""
    return metric if protocol is None else f"{metric}_{protocol}"


def _positions(values: Sequence[Any], order: Sequence[Any] | None) -> tuple[dict[Any, float], bool]:
    """x position of each parameter value, and whether the axis is categorical.

    Numbers keep their value; anything else (stage names, model names) is placed at 0, 1, ...
    in `order` (default: first-seen order).
    """
    seen = list(dict.fromkeys(values))
    if order is None and all(_is_number(v) for v in seen):
        return {v: float(v) for v in seen}, False
    chosen = list(order) if order is not None else seen
    unknown = [v for v in seen if v not in chosen]
    if unknown:
        raise ValueError(f"parameter values {unknown} are not in order={chosen}")
    return {v: float(i) for i, v in enumerate(chosen)}, True


def metric_vs_param(
    rows: Sequence[dict[str, Any]],
    param: str,
    *,
    metrics: Sequence[str] = ("asr", "acc"),
    protocols: Sequence[str] | None = PROTOCOLS,
    hue: str | None = None,
    style: str | None = None,
    baseline: Sequence[dict[str, Any]] = (),
    order: Sequence[Any] | None = None,
    logx: bool = False,
    xlabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """A grid of panels: one row per metric, one column per protocol; x = `param`.

    Each panel draws the mean over rows sharing (hue, style, x) (e.g. the seeds) with a
    +- 1 std band, one line per hue value (colour) and style value (dash). Values are
    fractions shown in %. Keys: `param`, `hue`, `style` and `<metric>_<protocol>` (or the
    bare `<metric>` when `protocols` is None). `baseline` rows (e.g. the undefended model)
    become a grey dashed horizontal line at their mean. A row whose metric is None or NaN
    (an undefined measurement) is drawn as an 'x' at the bottom of its panel. A
    non-numeric `param` (or one given an `order`) is a categorical axis in `order`
    (default: first-seen order). `logx` puts a numeric x on a log2 scale.
    """
    if not rows:
        raise ValueError("no rows to plot")
    keys = [param, *(k for k in (hue, style) if k is not None)]
    missing = sorted({k for row in rows for k in keys if k not in row})
    if missing:
        raise ValueError(f"rows lack keys {missing}; each row needs {keys}")
    columns = [metric_column(m, p) for m in metrics for p in (protocols or (None,))]
    absent = [c for c in columns if all(c not in row for row in rows)]
    if absent:
        raise ValueError(f"no row carries {absent}; rows have keys {sorted(rows[0])}")
    positions, categorical = _positions([row[param] for row in rows], order)
    if logx and not categorical and min(positions.values()) <= 0:
        raise ValueError(
            f"logx needs {param} > 0, got {sorted(v for v in positions if v <= 0)}; "
            "drop those rows or plot on a linear axis"
        )
    frame = pd.DataFrame(
        {
            "x": [positions[row[param]] for row in rows],
            **{k: [str(row[k]) for row in rows] for k in (hue, style) if k is not None},
            **{c: [_percent(row.get(c)) for row in rows] for c in columns},
        }
    )
    use_style()
    hue_levels = list(dict.fromkeys(frame[hue])) if hue else []
    palette = dict(zip(hue_levels, sns.color_palette("colorblind", len(hue_levels)), strict=True))
    panel_protocols = list(protocols) if protocols is not None else [None]
    fig, axes = plt.subplots(
        len(metrics),
        len(panel_protocols),
        # upright tick labels take about an inch below the bottom row
        figsize=(
            max(6.0, 4.2 * len(panel_protocols)),
            3.2 * len(metrics) + (1.0 if categorical and _crowded(positions) else 0.0),
        ),
        squeeze=False,
        sharex=True,
    )
    for i, metric in enumerate(metrics):
        for j, protocol in enumerate(panel_protocols):
            ax = axes[i, j]
            column = metric_column(metric, protocol)
            defined = frame.dropna(subset=[column])
            if not defined.empty:
                sns.lineplot(
                    data=defined,
                    x="x",
                    y=column,
                    hue=hue,
                    style=style,
                    hue_order=hue_levels or None,
                    palette=palette or None,
                    errorbar="sd",
                    marker="o",
                    ax=ax,
                    legend="auto" if i == j == 0 else False,
                    # unordered levels (stages, models, rules): points and bars, no lines
                    **({"err_style": "bars", "linestyle": ""} if categorical else {}),
                )
            _mark_undefined(ax, frame[frame[column].isna()], hue, palette)
            _draw_baseline(ax, baseline, column)
            ax.set_ylim(-8, 105)
            ax.set_ylabel(METRIC_LABELS.get(metric, metric) if j == 0 else "")
            ax.set_xlabel(xlabel or param if i == len(metrics) - 1 else "")
            if protocol is not None:
                ax.set_title(protocol_label(protocol, metric), fontsize=10)
            if categorical:
                _categorical_ticks(ax, positions)
            elif logx:
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(positions.values()), [f"{v:g}" for v in sorted(positions)])
                ax.minorticks_off()
    has_legend = _figure_legend(fig, axes[0, 0])
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.82 if has_legend else 1, 1))
    return fig


# A categorical axis whose labels hold more characters than this (e.g. five model names) gets
# them upright: level, they overlap in a 4-inch panel.
LEVEL_TICK_CHARS = 30


def _crowded(positions: dict[Any, float]) -> bool:
    """Whether the categories' names would overlap as level tick labels."""
    return sum(len(str(n)) for n in positions) > LEVEL_TICK_CHARS


def _categorical_ticks(ax: Any, positions: dict[Any, float]) -> None:
    """Ticks at the categories' positions, labelled by name; upright when they would crowd."""
    names = sorted(positions, key=positions.__getitem__)
    rotation = 90 if _crowded(positions) else 0
    ax.set_xticks([positions[n] for n in names], [str(n) for n in names], rotation=rotation)


def _percent(value: Any) -> float:
    """A fraction as a percentage; None/NaN -> NaN."""
    return math.nan if _is_missing(value) else 100.0 * float(value)


def _mark_undefined(ax: Any, frame: pd.DataFrame, hue: str | None, palette: dict[str, Any]) -> None:
    """An 'x' at the bottom of the panel for every undefined (NaN) measurement."""
    if frame.empty:
        return
    colours = [palette[v] for v in frame[hue]] if hue else ["0.3"] * len(frame)
    ax.scatter(frame["x"], [-4.0] * len(frame), marker="x", s=60, c=colours, label="undefined")


def _draw_baseline(ax: Any, baseline: Sequence[dict[str, Any]], column: str) -> None:
    """A grey dashed line at the mean of the baseline rows' `column` (if any is defined)."""
    values = [_percent(row.get(column)) for row in baseline]
    values = [v for v in values if not math.isnan(v)]
    if values:
        ax.axhline(sum(values) / len(values), color="0.4", linestyle="--", label="undefended")


def _figure_legend(fig: Figure, first: Any) -> bool:
    """One legend for the figure, right of the panels (lines, baseline, undefined markers);
    False when there is nothing to label (a single unnamed line)."""
    handles, labels = first.get_legend_handles_labels()
    if first.get_legend() is not None:
        first.get_legend().remove()
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label in ("undefended", "undefined") and label not in labels:
                if label == "undefined":
                    handle = Line2D([], [], marker="x", linestyle="", color="0.3")
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.82, 0.5), frameon=False)
    return bool(handles)
