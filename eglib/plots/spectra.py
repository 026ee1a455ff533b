"""Observation 2 figures: singular spectra per group, t-SNE of top-k vs tail projections, and
the numbers that test the claim (trigger energy in the top-k subspace, neighbour purity)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from eglib.params import check_int
from eglib.plots.common import use_style

SPECTRUM_GROUPS = ("clean", "triggered", "mixed", "diff")
SPECTRUM_STYLES = {"clean": "-", "triggered": "--", "mixed": ":", "diff": "-"}
SPECTRUM_LABELS = {
    "clean": "clean f(x)",
    "triggered": "triggered f(x+t)",
    "mixed": "mixed",
    "diff": "f(x+t) - f(x)",
}


def _grid(n_rows: int, n_cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    use_style()
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False
    )
    return fig, axes


def singular_spectra(records: Sequence[dict[str, Any]], *, title: str | None = None) -> Figure:
    """One panel per (attack, stage): normalised singular values s_i / sum(s) on a log scale.

    `records`: dicts with `attack`, `stage`, `group` (clean, triggered, mixed or diff),
    `spectrum` (descending values) and `rows` (the batch's row count, equal for all groups
    of a panel); a mixed record may give `poisoned_rows` (its triggered rows) for the legend.
    """
    if not records:
        raise ValueError("no spectrum records to plot")
    for panel in dict.fromkeys((r["attack"], r["stage"]) for r in records):
        in_panel = {int(r["rows"]) for r in records if (r["attack"], r["stage"]) == panel}
        if len(in_panel) > 1:
            raise ValueError(
                f"panel {panel}: groups of {sorted(in_panel)} rows; effective rank grows with "
                "the row count, so a panel's groups must have equal counts"
            )
    attacks = list(dict.fromkeys(str(r["attack"]) for r in records))
    stages = list(dict.fromkeys(str(r["stage"]) for r in records))
    fig, axes = _grid(len(attacks), len(stages), 3.4, 2.9)
    colors = dict(
        zip(SPECTRUM_GROUPS, sns.color_palette("colorblind", len(SPECTRUM_GROUPS)), strict=True)
    )
    mixed_label = _mixed_label(records)
    for rec in records:
        ax = axes[attacks.index(str(rec["attack"])), stages.index(str(rec["stage"]))]
        values = np.asarray(rec["spectrum"], dtype=float)
        values = values / values.sum() if values.sum() > 0 else values
        group = str(rec["group"])
        ax.semilogy(
            np.arange(1, len(values) + 1),
            np.clip(values, 1e-12, None),
            color=colors.get(group),
            linestyle=SPECTRUM_STYLES.get(group, "-"),
            linewidth=1.6,
            label=mixed_label if group == "mixed" else SPECTRUM_LABELS.get(group, group),
        )
        ax.set_title(f"{rec['attack']} - {rec['stage']}", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("index i")
    for ax in axes[:, 0]:
        ax.set_ylabel("s_i / sum(s)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=len(handles),
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    counts = sorted({int(r["rows"]) for r in records})
    fig.suptitle(
        title
        or f"normalised singular spectra, {'/'.join(map(str, counts))} rows per batch "
        "(seeded subsample, equal counts)",
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.98))
    return fig


def _mixed_label(records: Sequence[dict[str, Any]]) -> str:
    """'mixed (13 of 128 rows triggered)' when every mixed record says the same, else 'mixed'."""
    shares = {
        (int(r["poisoned_rows"]), int(r["rows"]))
        for r in records
        if r["group"] == "mixed" and "poisoned_rows" in r
    }
    if len(shares) != 1:
        return SPECTRUM_LABELS["mixed"]
    ((poisoned, rows),) = shares
    return f"mixed ({poisoned} of {rows} rows triggered)"


def class_palette(n_classes: int) -> list[tuple[float, float, float]]:
    """One distinct colour per class: tab10 up to 10 classes, tab20 up to 20, else husl hues."""
    check_int("n_classes", n_classes, 1)
    if n_classes <= 10:
        return list(sns.color_palette("tab10", 10))[:n_classes]
    if n_classes <= 20:
        return list(sns.color_palette("tab20", 20))[:n_classes]
    return list(sns.color_palette("husl", n_classes))  # evenly spaced hues, equal lightness


def projection_tsne(records: Sequence[dict[str, Any]], *, title: str | None = None) -> Figure:
    """t-SNE scatter per (attack, stage) and space (top-k | tail): colour = class, x = poisoned.

    `records`: dicts with `attack`, `stage`, `space` ('top' or 'tail'), `xy` (n, 2),
    `classes` (n,) true (source) classes (ints >= 0), `poisoned` (n,) bools, and optionally
    `caption` (text under the panel title, e.g. the separation scores). Colours come from
    `class_palette` sized to the largest class + 1, the same in every panel.
    """
    if not records:
        raise ValueError("no t-SNE records to plot")
    panels = list(dict.fromkeys((str(r["attack"]), str(r["stage"])) for r in records))
    spaces = list(dict.fromkeys(str(r["space"]) for r in records))
    all_classes = np.concatenate([np.asarray(r["classes"]).reshape(-1) for r in records])
    if all_classes.size and (
        not np.issubdtype(all_classes.dtype, np.integer) or all_classes.min() < 0
    ):
        raise ValueError(
            f"classes must be integers >= 0; got dtype {all_classes.dtype}, "
            f"min {all_classes.min()!r}"
        )
    palette = class_palette(int(all_classes.max()) + 1 if all_classes.size else 1)
    fig, axes = _grid(len(panels), len(spaces), 3.8, 3.6)
    for rec in records:
        ax = axes[
            panels.index((str(rec["attack"]), str(rec["stage"]))), spaces.index(str(rec["space"]))
        ]
        xy = np.asarray(rec["xy"], dtype=float)
        classes = np.asarray(rec["classes"], dtype=int)
        poisoned = np.asarray(rec["poisoned"], dtype=bool)
        colors = [palette[c] for c in classes]
        ax.scatter(
            xy[~poisoned, 0],
            xy[~poisoned, 1],
            s=7,
            c=[colors[i] for i in np.flatnonzero(~poisoned)],
            alpha=0.7,
            linewidths=0,
            label="clean (colour = class)",
        )
        ax.scatter(
            xy[poisoned, 0],
            xy[poisoned, 1],
            s=22,
            c=[colors[i] for i in np.flatnonzero(poisoned)],
            marker="X",
            edgecolors="black",
            linewidths=0.6,
            label="triggered",
        )
        caption = f"\n{rec['caption']}" if rec.get("caption") else ""
        ax.set_title(f"{rec['attack']} - {rec['stage']}: {rec['space']}{caption}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, -0.01)
    )
    fig.suptitle(title or "t-SNE of a mixed batch: top-k projection vs tail", y=1.0)
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    return fig


SUMMARY_PANELS: dict[str, dict[str, str]] = {
    "trigger energy in the subspace": {
        "energy_top_mixed": "top-k of mixed batch",
        "energy_top_clean": "top-k of clean batch",
        "energy_random": "random k-subspace",
    },
    "kNN purity of triggered samples": {
        "knn_poison_top": "top-k",
        "knn_poison_tail": "tail",
        "knn_poison_chance": "chance",
    },
    "source-class agreement of triggered": {
        "knn_source_top": "top-k",
        "knn_source_tail": "tail",
    },
}


def separation_summary(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> Figure:
    """Bars per (attack, stage) for the numbers behind observation 2 (see `SUMMARY_PANELS`).

    `rows`: the spectra study's rows (one per attack, stage and, when they carry `seed`,
    seed) with the columns named in `SUMMARY_PANELS`; missing columns are skipped. With
    several seeds a bar is their mean and a black dot marks each seed's value.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["attack"]), str(r["stage"])), []).append(r)
    several_seeds = any(len(g) > 1 for g in groups.values())
    use_style()
    fig, axes = plt.subplots(1, len(SUMMARY_PANELS), figsize=(5.2 * len(SUMMARY_PANELS), 4.4))
    ticks = [f"{attack}\n{stage}" for attack, stage in groups]
    x = np.arange(len(groups))
    for ax, (panel, columns) in zip(axes, SUMMARY_PANELS.items(), strict=True):
        present = [c for c in columns if any(c in r for r in rows)]
        width = 0.8 / max(1, len(present))
        for i, column in enumerate(present):
            values = [[float(r.get(column, np.nan)) for r in g] for g in groups.values()]
            at = x + (i - (len(present) - 1) / 2) * width
            ax.bar(at, [np.mean(v) for v in values], width, label=columns[column])
            if several_seeds:
                ax.plot(
                    np.repeat(at, [len(v) for v in values]),
                    np.concatenate(values),
                    "o",
                    color="black",
                    markersize=2.5,
                    label="one seed" if i == 0 else None,
                )
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(panel, fontsize=10)
        if present:  # below the panel: the bars reach the top
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    k_values = sorted({int(r["k"]) for r in rows if "k" in r})
    seeds = sorted({int(r["seed"]) for r in rows if "seed" in r})
    seed_note = f"; mean of seeds {', '.join(map(str, seeds))}" if several_seeds else ""
    fig.suptitle(
        title
        or f"is the trigger in the top-k subspace? (k = {'/'.join(map(str, k_values))}{seed_note})",
        y=1.0,
    )
    fig.tight_layout()
    return fig
