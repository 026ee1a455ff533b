"""Effective (or stable) rank of clean, triggered and difference features during training
(per epoch, or per optimizer step where the rows carry steps), + ACC/ASR."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from eglib.plots.common import use_style

RANK_GROUPS = ("clean", "triggered", "diff")
GROUP_LABELS = {"clean": "clean f(x)", "triggered": "triggered f(x+t)", "diff": "f(x+t) - f(x)"}
# uncentred (as recorded since the start) and centred (column mean over rows subtracted first)
MEASURES = {
    "erank": "effective rank",
    "srank": "stable rank",
    "erank_centred": "effective rank (centred)",
    "srank_centred": "stable rank (centred)",
}


def rank_stages(rows: Sequence[dict[str, Any]], measure: str = "erank") -> list[str]:
    """Stage names that rows carry `<measure>_clean/<stage>` for, in first-seen order."""
    prefix = f"{measure}_clean/"
    stages: list[str] = []
    for row in rows:
        stages.extend(
            k[len(prefix) :] for k in row if k.startswith(prefix) and k[len(prefix) :] not in stages
        )
    return stages


def _over_seeds(
    rows: Sequence[dict[str, Any]], x_key: str
) -> tuple[list[dict[str, Any]], dict[tuple[str, Any], dict[str, float]]]:
    """Rows averaged over their seeds per (attack, x), and the sd of each value there."""
    frame = pd.DataFrame(list(rows))
    values = [c for c in frame.columns if c not in ("attack", "seed", x_key)]
    frame[values] = frame[values].astype(float)  # None (no value) -> NaN
    grouped = frame.groupby(["attack", x_key], sort=False)[values]
    means = grouped.mean().reset_index()
    sds = grouped.std(ddof=1)
    return means.to_dict("records"), {key: dict(row) for key, row in sds.iterrows()}


def rank_curves(
    rows: Sequence[dict[str, Any]], *, measure: str = "erank", title: str | None = None
) -> Figure:
    """One panel per (attack, stage): rank of clean / triggered / difference features during
    training.

    `rows`: dicts with `attack`, `epoch`, `acc`, `asr`, `rank_samples` and
    `<measure>_<group>/<stage>` for group in clean, triggered, diff (as the rank_vs_asr
    study builds them). When every row has a `step` (optimizer steps; mid-epoch probes
    included), x is the step on a symlog axis (linear up to the first step after 0), a
    dotted line at the end of epoch 1;
    otherwise x is the epoch. ACC (dashed) and ASR (dotted), in %, share each panel on a
    twin axis, with `asr_correct` (dash-dot: ASR among the images classified right without
    the trigger) where rows carry it. Rows of several seeds (`seed`) are averaged per
    attack and x; a band shows each rank's sd over the seeds.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; allowed: {sorted(MEASURES)}")
    stages = rank_stages(rows, measure)
    if not rows or not stages:
        raise ValueError(f"rows carry no '{measure}_clean/<stage>' values; nothing to plot")
    by_step = all(r.get("step") is not None for r in rows)
    x_key = "step" if by_step else "epoch"
    n_seeds = len({r.get("seed") for r in rows})
    sds: dict[tuple[str, Any], dict[str, float]] = {}
    if n_seeds > 1:
        rows, sds = _over_seeds(rows, x_key)
    # linear from 0 to the first probe, logarithmic beyond: no width spent on empty decades
    first_step = min((r["step"] for r in rows if by_step and r["step"] > 0), default=1)
    last_step = max((r["step"] for r in rows if by_step), default=1)
    decades = (10**k for k in range(1, len(str(last_step)) + 1))
    step_ticks = [0, first_step, *(t for t in decades if 2 * first_step <= t <= last_step)]
    attacks = list(dict.fromkeys(str(r["attack"]) for r in rows))
    use_style()
    colors = dict(zip(RANK_GROUPS, sns.color_palette("colorblind", len(RANK_GROUPS)), strict=True))
    fig, axes = plt.subplots(
        len(attacks), len(stages), figsize=(3.6 * len(stages), 3.0 * len(attacks)), squeeze=False
    )
    legend_lines: list[Any] = []
    for i, attack in enumerate(attacks):
        mine = sorted((r for r in rows if r["attack"] == attack), key=lambda r: r[x_key])
        xs = [r[x_key] for r in mine]
        epoch_one = [r["step"] for r in mine if r["epoch"] == 1] if by_step else []
        for j, stage in enumerate(stages):
            ax = axes[i, j]
            for group in RANK_GROUPS:
                name = f"{measure}_{group}/{stage}"
                values = [r.get(name) for r in mine]
                ax.plot(xs, values, marker="o", color=colors[group], label=GROUP_LABELS[group])
                if sds:
                    sd = np.array([sds[(attack, x)][name] for x in xs])
                    mean = np.array(values, dtype=float)
                    ax.fill_between(xs, mean - sd, mean + sd, color=colors[group], alpha=0.2)
            ax.set_title(f"{attack} - {stage}", fontsize=10)
            if by_step:
                ax.set_xscale("symlog", linthresh=first_step, linscale=0.4)
                ax.set_xticks(step_ticks, [str(t) for t in step_ticks])
                ax.set_xlabel("optimizer step")
                for step in epoch_one:
                    ax.axvline(step, color="0.6", linewidth=0.8, linestyle=":")
            else:
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if j == 0:
                ax.set_ylabel(MEASURES[measure])
            twin = ax.twinx()
            twin.grid(False)
            twin.plot(xs, [100 * r["acc"] for r in mine], "--", color="0.35", label="ACC (%)")
            twin.plot(
                xs,
                [100 * r["asr"] for r in mine],
                ":",
                color="C4",
                linewidth=2.2,
                label="ASR (%)",
            )
            if any(r.get("asr_correct") is not None for r in mine):
                twin.plot(
                    xs,
                    [
                        np.nan if r.get("asr_correct") is None else 100 * r["asr_correct"]
                        for r in mine
                    ],
                    "-.",
                    color="C3",
                    label="ASR, correct only (%)",
                )
            twin.set_ylim(-5, 105)
            if not legend_lines:  # the groups' lines and ACC/ASR, not the epoch marker
                lines = [*ax.get_lines(), *twin.get_lines()]
                legend_lines = [ln for ln in lines if not ln.get_label().startswith("_")]
            if j == len(stages) - 1:
                twin.set_ylabel("ACC / ASR (%)")
    fig.legend(
        legend_lines,
        [h.get_label() for h in legend_lines],
        loc="lower center",
        ncol=len(legend_lines),
        bbox_to_anchor=(0.5, -0.02),
        frameon=False,
    )
    counts = sorted({int(r["rank_samples"]) for r in rows if r.get("rank_samples") is not None})
    count_text = "/".join(str(c) for c in counts) if counts else "?"
    when = "per optimizer step (dotted: end of epoch 1)" if by_step else "per epoch"
    seeds_text = f"; mean of {n_seeds} seeds, band: sd" if n_seeds > 1 else ""
    fig.suptitle(
        title
        or f"{MEASURES[measure]} {when} at equal counts: {count_text} test images per group"
        + seeds_text,
        y=1.0,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.98))
    return fig


def rank_ratio_bars(rows: Sequence[dict[str, Any]], conventions: Sequence[str]) -> Figure:
    """A grid of bars: rows `ratio_<convention>` (erank triggered / clean) and
    `diff_ratio_<convention>` (erank of f(x+t) - f(x) / clean), a column per convention; per
    stage (x) and attack (hue), the mean over seeds (error bar: their sd); dashes at 1."""
    if not rows:
        raise ValueError("no rows to plot")
    kinds = {"ratio": "triggered / clean", "diff_ratio": "f(x+t) - f(x) / clean"}
    needed = [f"{kind}_{c}" for kind in kinds for c in conventions]
    missing = [name for name in needed if name not in rows[0]]
    if missing:
        raise ValueError(f"rows lack {missing}; they have {sorted(rows[0])}")
    use_style()
    data = pd.DataFrame(list(rows))
    fig, axes = plt.subplots(
        len(kinds), len(conventions), figsize=(5.5 * len(conventions), 6.6), sharey="row"
    )
    axes = np.asarray(axes).reshape(len(kinds), len(conventions))
    for (i, (kind, label)), (j, convention) in itertools.product(
        enumerate(kinds.items()), enumerate(conventions)
    ):
        ax = axes[i, j]
        sns.barplot(
            data=data, x="stage", y=f"{kind}_{convention}", hue="attack", errorbar="sd", ax=ax
        )
        ax.axhline(1.0, color="0.3", lw=1, ls="--")
        ax.set_title(f"{convention} features", fontsize="medium")
        ax.set_ylabel(f"effective rank:\n{label}")
        ax.set_xlabel("stage" if i == len(kinds) - 1 else "")
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(labels))
    rows_per_group = data["rows"].iloc[0]
    fig.suptitle(
        f"Triggered features' effective rank, uncentred vs centred ({rows_per_group} rows)", y=0.995
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig
