"""Shared plotting helpers: the house style and atomic saving of figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure

from eglib.io import write_atomic

PROTOCOLS = ("per_sample", "mixed", "pure")
PROTOCOL_LABELS = {
    "per_sample": "per-sample",
    "mixed": "mixed batches",
    "pure": "pure batches",
}
# The pure protocol reads ACC on all-clean batches and ASR on all-triggered ones.
PURE_BATCHES = {"acc": "pure clean batches", "asr": "pure triggered batches"}


def protocol_label(protocol: str, metric: str | None = None) -> str:
    """How figures and tables name a protocol; under 'pure', which batches `metric` was read on."""
    if protocol == "pure" and metric in PURE_BATCHES:
        return PURE_BATCHES[metric]
    return PROTOCOL_LABELS.get(protocol, protocol)


def use_style() -> None:
    """Seaborn's paper-friendly style, used by every figure of eglib."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    """Save a figure as PNG atomically (temp file in the same folder, then rename)."""
    target = Path(path)
    write_atomic(target, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return target
