"""Training curves of one or more runs, from their records' per-epoch history."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from eglib.plots.common import use_style


def training_curves(records: Mapping[str, dict[str, Any]]) -> Figure:
    """Loss, clean ACC and ASR per epoch for each named record (one line per run)."""
    use_style()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, record in records.items():
        history = record["history"]
        epochs = [row["epoch"] for row in history]
        axes[0].plot(epochs, [row["loss"] for row in history], marker="o", label=label)
        axes[1].plot(epochs, [100 * row["acc"] for row in history], marker="o", label=label)
        if all("asr" in row for row in history):
            axes[2].plot(epochs, [100 * row["asr"] for row in history], marker="o", label=label)
    for ax, title in zip(
        axes,
        ("training loss", "clean accuracy ACC (%)", "attack success rate ASR (%)"),
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[1].legend()
    fig.tight_layout()
    return fig
