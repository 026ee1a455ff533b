"""Shared plotting helpers: the house style and atomic saving of figures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure

PROTOCOLS = ("per_sample", "mixed", "pure")
PROTOCOL_LABELS = {
    "per_sample": "per-sample",
    "mixed": "mixed batches",
    "pure": "pure triggered batches",
}


def use_style() -> None:
    """Seaborn's paper-friendly style, used by every figure of eglib."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    """Save a figure as PNG atomically (temp file in the same folder, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    plt.close(fig)
    return target
