"""Tables drawn as heat maps: attacks x defences (mean +- std over seeds, per protocol),
detection quality per detector and poison rate, and the adaptive attacks' trigger ranks.

Every function takes *summary rows*: plain dicts with the key columns (e.g. `attack`,
`defense`) and, per metric, its mean under the metric's name and its sample std under
`<metric>_std` (NaN or absent for a single seed), as `eglib.studies` builds them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eglib.plots.common import PROTOCOLS, protocol_label, use_style
from eglib.plots.rank import GROUP_LABELS, RANK_GROUPS

Key = str | Sequence[str]

# how each metric is shown: label, colour map, and whether it is a fraction shown in %
METRIC_STYLE: dict[str, tuple[str, str, bool]] = {
    "acc": ("ACC (%)", "Greens", True),
    "asr": ("ASR (%)", "Reds", True),
    "auroc": ("AUROC", "RdBu_r", False),
    "tpr": ("poison removed (%)", "Greens", True),
    "fpr": ("clean removed (%)", "Reds", True),
}


def _missing(value: Any) -> bool:
    """True for None and NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _base_metric(metric: str) -> str:
    """'asr_mixed' -> 'asr', 'auroc' -> 'auroc' (the key of METRIC_STYLE)."""
    return metric.split("_", 1)[0]


def metric_style(metric: str) -> tuple[str, str, bool]:
    """(label, colour map, shown in %) of a metric or a metric under a protocol ('asr_pure')."""
    base = _base_metric(metric)
    if base not in METRIC_STYLE:
        raise ValueError(
            f"unknown metric {metric!r}; allowed: {sorted(METRIC_STYLE)} (+ _protocol)"
        )
    label, cmap, percent = METRIC_STYLE[base]
    protocol = metric[len(base) + 1 :]
    if protocol:
        label = f"{label}, {protocol_label(protocol, base)}"
    return label, cmap, percent


def mean_std_label(mean: Any, std: Any = None, *, scale: float = 1.0, digits: int = 1) -> str:
    """'93.1 ± 0.4' (values times `scale`); just the mean when std is None/NaN; '-' for no mean."""
    if _missing(mean):
        return "-"
    text = f"{scale * float(mean):.{digits}f}"
    return text if _missing(std) else f"{text} ± {scale * float(std):.{digits}f}"


def formatted_table(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    *,
    keys: Sequence[str] = ("attack", "defense"),
) -> list[dict[str, Any]]:
    """Summary rows as display rows: the `keys`, then one 'mean ± std' string per metric,
    headed by its label ('ASR (%), mixed batches'; fractions in %). Metrics unknown to
    `METRIC_STYLE` (e.g. 'erank_diff') keep their name and scale."""
    out = []
    for row in rows:
        shown: dict[str, Any] = {key: row.get(key) for key in keys}
        for metric in metrics:
            known = _base_metric(metric) in METRIC_STYLE
            label, _, percent = metric_style(metric) if known else (metric, "", False)
            digits = 1 if percent or not known else 2
            shown[label] = mean_std_label(
                row.get(metric),
                row.get(f"{metric}_std"),
                scale=100.0 if percent else 1.0,
                digits=digits,
            )
        out.append(shown)
    return out


def _key_of(row: dict[str, Any], key: Key) -> Any:
    """A row's value of one key, or the ' / '-joined values of several."""
    if isinstance(key, str):
        if key not in row:
            raise ValueError(f"row lacks the key {key!r}; it has {sorted(row)}")
        return row[key]
    return " / ".join(str(_key_of(row, k)) for k in key)


def pivot(
    rows: Sequence[dict[str, Any]],
    value: str,
    *,
    index: Key,
    columns: Key,
    index_order: Sequence[Any] | None = None,
    column_order: Sequence[Any] | None = None,
) -> tuple[np.ndarray, list[Any], list[Any]]:
    """Lay `row[value]` out as a matrix: (values (n_index, n_columns), index, column labels).

    Labels come in first-seen order unless given; a missing cell (or a None value) is NaN;
    two rows for one cell are a ValueError (aggregate over seeds first).
    """
    seen_index = list(dict.fromkeys(_key_of(r, index) for r in rows))
    seen_cols = list(dict.fromkeys(_key_of(r, columns) for r in rows))
    ind = list(index_order) if index_order is not None else seen_index
    cols = list(column_order) if column_order is not None else seen_cols
    grid = np.full((len(ind), len(cols)), np.nan)
    filled = np.zeros_like(grid, dtype=bool)
    for row in rows:
        i_key, c_key = _key_of(row, index), _key_of(row, columns)
        if i_key not in ind or c_key not in cols:
            continue
        i, j = ind.index(i_key), cols.index(c_key)
        if filled[i, j]:
            raise ValueError(f"two rows for the cell ({i_key!r}, {c_key!r}); aggregate them first")
        filled[i, j] = True
        got = row.get(value)
        if got is None:  # not measured: stays NaN
            continue
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            raise ValueError(
                f"cell ({i_key!r}, {c_key!r}): {value}={got!r}; expected a number or None"
            )
        grid[i, j] = float(got)
    return grid, ind, cols


def metric_heatmap(
    rows: Sequence[dict[str, Any]],
    metric: str,
    *,
    index: Key = "attack",
    columns: Key = "defense",
    index_order: Sequence[Any] | None = None,
    column_order: Sequence[Any] | None = None,
    column_label: Callable[[Any], str] = str,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Heat map of the mean of `metric` (rows x columns), each cell annotated 'mean ± std'.

    The colour is the mean (fractions shown in %, on a fixed 0-100 scale; AUROC on 0-1, so
    chance, 0.5, is the middle colour); the std comes from `<metric>_std`. Empty cells stay
    blank.
    """
    label, cmap, percent = metric_style(metric)
    means, ind, cols = pivot(
        rows,
        metric,
        index=index,
        columns=columns,
        index_order=index_order,
        column_order=column_order,
    )
    if means.size == 0:
        raise ValueError(f"no rows to draw for {metric!r}")
    stds, _, _ = pivot(
        rows, f"{metric}_std", index=index, columns=columns, index_order=ind, column_order=cols
    )
    scale = 100.0 if percent else 1.0
    digits = 1 if percent else 2
    labels = np.vectorize(
        lambda m, s: mean_std_label(m, s, scale=scale, digits=digits), otypes=[object]
    )(means, stds)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 + 1.25 * len(cols), 0.9 + 0.5 * len(ind)))
    vmin, vmax = (0.0, 100.0) if percent else (0.0, 1.0)
    sns.heatmap(
        scale * means,
        annot=labels,
        fmt="",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        cbar_kws={"label": METRIC_STYLE[_base_metric(metric)][0]},
        annot_kws={"fontsize": 8},
        linewidths=0.5,
        xticklabels=[column_label(c) for c in cols],
        yticklabels=[str(i) for i in ind],
        ax=ax,
    )
    ax.set_xlabel(columns if isinstance(columns, str) else " / ".join(columns))
    ax.set_ylabel(index if isinstance(index, str) else " / ".join(index))
    ax.set_title(title if title is not None else label, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    ax.tick_params(axis="y", rotation=0)
    return ax


def _panels(n: int, width: float, height: float, labels: float) -> tuple[Figure, list[Axes]]:
    """A figure with n side-by-side panels of the given size each, plus the `labels` inches
    the first panel's row labels take (the others drop theirs: see `_finish_panels`); the
    constrained layout gives the panels equal widths beside those labels."""
    use_style()
    fig, axes = plt.subplots(
        1, n, figsize=(width * n + labels, height), squeeze=False, layout="constrained"
    )
    return fig, list(axes[0])


def _finish_panels(fig: Figure, axes: Sequence[Axes], title: str | None) -> Figure:
    """Panels side by side share their row labels (the axis title, and the tick labels where
    they are the first panel's, are kept on the first only); `title` goes above them all."""
    first = [t.get_text() for t in axes[0].get_yticklabels()]
    for ax in axes[1:]:
        ax.set_ylabel("")
        if [t.get_text() for t in ax.get_yticklabels()] == first:
            ax.tick_params(axis="y", labelleft=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _size(rows: Sequence[dict[str, Any]], index: Key, columns: Key) -> tuple[float, float, float]:
    """Panel (width, height) in inches for a table of these rows, and the width of the row
    labels and axis title beside the first panel."""
    labels = {str(_key_of(r, index)) for r in rows}
    n_col = len({_key_of(r, columns) for r in rows})
    label_width = 0.45 + 0.07 * max(len(label) for label in labels)
    return 1.5 + 1.3 * n_col, max(2.6, 1.3 + 0.45 * len(labels)), label_width


def defence_heatmaps(
    table: Sequence[dict[str, Any]],
    *,
    metrics: Sequence[str] = ("asr", "acc"),
    protocol: str | None = "per_sample",
    index: Key = "attack",
    columns: Key = "defense",
    title: str | None = None,
) -> Figure:
    """One heat map per metric (default ASR and ACC) of an attacks x defences summary table,
    under one protocol (`acc_per_sample`, ...; None: the bare `acc`/`asr` columns)."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    if not table:
        raise ValueError("the table has no rows; nothing to draw")
    fig, axes = _panels(len(metrics), *_size(table, index, columns))
    for ax, metric in zip(axes, metrics, strict=True):
        column = metric if protocol is None else f"{metric}_{protocol}"
        metric_heatmap(table, column, index=index, columns=columns, ax=ax)
    return _finish_panels(fig, axes, title)


def protocol_heatmaps(
    table: Sequence[dict[str, Any]],
    *,
    metric: str = "asr",
    protocols: Sequence[str] = PROTOCOLS,
    index: Key = "attack",
    columns: Key = "defense",
    title: str | None = None,
) -> Figure:
    """The same metric under each evaluation protocol, side by side (one heat map each)."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; allowed: {list(PROTOCOLS)}")
    if not table:
        raise ValueError("the table has no rows; nothing to draw")
    fig, axes = _panels(len(protocols), *_size(table, index, columns))
    for ax, protocol in zip(axes, protocols, strict=True):
        metric_heatmap(table, f"{metric}_{protocol}", index=index, columns=columns, ax=ax)
    return _finish_panels(fig, axes, title)


def rate_label(rate: Any) -> str:
    """0.05 -> '5 %' (a poison rate as a column label)."""
    return f"{100 * float(rate):g} %"


def detection_heatmaps(
    rows: Sequence[dict[str, Any]],
    *,
    metrics: Sequence[str] = ("auroc", "tpr", "fpr"),
    index: Key = ("attack", "detector"),
    column: str = "poison_rate",
    title: str | None = None,
) -> Figure:
    """Detection quality per (attack, detector) and poison rate: one heat map per metric
    (AUROC, fraction of the poison removed, fraction of the clean samples removed).

    `rows`: one per (attack, detector, poison_rate) with each metric's mean and `_std`."""
    if not rows:
        raise ValueError("no detection rows; nothing to draw")
    order = sorted({r[column] for r in rows})
    fig, axes = _panels(len(metrics), *_size(rows, index, column))
    for ax, metric in zip(axes, metrics, strict=True):
        metric_heatmap(
            rows,
            metric,
            index=index,
            columns=column,
            column_order=order,
            column_label=rate_label,
            ax=ax,
        )
        ax.set_xlabel("poison rate")
    return _finish_panels(fig, axes, title)


def trigger_rank_bars(
    rows: Sequence[dict[str, Any]],
    *,
    measure: str = "erank",
    groups: Sequence[str] = RANK_GROUPS,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Bars of `<measure>_<group>` (mean, std as error bar) per attack, one colour per group:
    the rank of clean, triggered and trigger-difference features of each attack."""
    if not rows:
        raise ValueError("no rows; nothing to draw")
    attacks = list(dict.fromkeys(str(r["attack"]) for r in rows))
    if len(attacks) != len(rows):
        raise ValueError("one row per attack expected (filter by defence first)")
    colors = sns.color_palette("colorblind", len(groups))
    if ax is None:
        _, ax = plt.subplots(figsize=(1.5 + 1.2 * len(attacks), 3.2))
    width = 0.8 / len(groups)
    x = np.arange(len(attacks))
    for g, group in enumerate(groups):
        key = f"{measure}_{group}"
        means = [np.nan if _missing(r.get(key)) else float(r[key]) for r in rows]
        stds = [0.0 if _missing(r.get(f"{key}_std")) else float(r[f"{key}_std"]) for r in rows]
        ax.bar(
            x + (g - (len(groups) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            color=colors[g],
            label=GROUP_LABELS.get(group, group),
        )
    ax.set_xticks(x, attacks)
    ax.set_ylabel("effective rank" if measure == "erank" else "stable rank")
    ax.set_ylim(0, 1.3 * np.nanmax(ax.get_ylim()))  # headroom for the legend
    ax.legend(fontsize=7, ncol=len(groups), loc="upper center")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def adaptive_summary(
    table: Sequence[dict[str, Any]],
    *,
    rank_defense: str = "none",
    protocol: str = "per_sample",
    rank_title: str | None = None,
    title: str | None = None,
) -> Figure:
    """Adaptive attacks at a glance: trigger-feature ranks under the `rank_defense` model
    (bars), then ASR and ACC (attacks x defences heat maps) under `protocol`."""
    ranked = [r for r in table if r.get("defense") == rank_defense]
    if not ranked:
        raise ValueError(f"no rows of defence {rank_defense!r} to take the ranks from")
    width, height, labels = _size(table, "attack", "defense")
    use_style()
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(4.5 + 2 * width + labels, max(height, 3.4)),
        width_ratios=[4.5, width, width],
        layout="constrained",
    )
    trigger_rank_bars(ranked, ax=axes[0], title=rank_title)
    for ax, metric in zip(axes[1:], ("asr", "acc"), strict=True):
        metric_heatmap(table, f"{metric}_{protocol}", ax=ax)
    return _finish_panels(fig, axes[1:], title)
