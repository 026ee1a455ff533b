"""The attack gallery (`python -m eglib gallery`): clean, poisoned and amplified |difference| per
attack, on real Fashion-MNIST and on synthetic smooth colour 32 px images (no CIFAR here)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eglib.data import load_dataset, take_subset
from eglib.plots.common import use_style
from eglib.poison import ATTACKS, Attack, attack_examples

FIT_IMAGES = 600  # images a learned attack is fitted on (its `quick_params` cap it further)
COLUMNS = ("clean", "poisoned", "|difference| (amplified)")


def smooth_colour_images(
    n: int, *, size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic colour images uint8 (n, 3, size, size) + int64 labels (n,), seeded.

    Each image is smooth random colour: 4x4 and 8x8 random colour grids upsampled bicubically
    and added, plus a class-dependent tint (so the labels carry a little signal, enough for
    attacks that fit a surrogate classifier). A stand-in where no colour data set is on disk.
    """
    if n < 1 or size < 8:
        raise ValueError(f"n={n}, size={size}; need n >= 1 and size >= 8")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    fine = torch.rand(n, 3, 8, 8, generator=generator)
    tints = torch.rand(num_classes, 3, 1, 1, generator=generator)
    image = (
        0.55 * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        + 0.25 * F.interpolate(fine, size=(size, size), mode="bicubic", align_corners=False)
        + 0.3 * tints[labels]
    )
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels


def _datasets(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Images to fit and show attacks on: real Fashion-MNIST and the synthetic colour set."""
    fashion = take_subset(*load_dataset("fashion-mnist", "train"), FIT_IMAGES, seed)
    return {
        "Fashion-MNIST 28 px": fashion,
        "synthetic colour 32 px": smooth_colour_images(FIT_IMAGES, seed=seed),
    }


def _build(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Attack:
    """The attack with its default parameters (learned ones: their CI-sized `quick_params`)."""
    cls = ATTACKS[name]
    params: dict[str, Any] = dict(getattr(cls, "quick_params", {})) if cls.needs_fit else {}
    attack = cls(target=0, num_classes=10, **params)
    if not attack.fitted:
        attack.fit(images, labels, torch.Generator().manual_seed(seed))
    return attack


def _example_row(attack: Attack, labels: torch.Tensor) -> int:
    """The row to show: a target-class image for clean-label attacks, else a non-target one."""
    wanted = labels == attack.target if attack.clean_label else labels != attack.target
    return int(wanted.nonzero()[0]) if bool(wanted.any()) else 0


def _show(ax: Axes, image: torch.Tensor) -> None:
    """Draw one uint8 (C, H, W) image (grey for one channel)."""
    array = image.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        ax.imshow(array[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(array)
    ax.set_xticks([])
    ax.set_yticks([])


def attack_gallery(seed: int = 0) -> Figure:
    """One row per registered attack: clean, poisoned, amplified |difference| on both image sets.

    Learned attacks are fitted with their smallest CI-sized parameters (`quick_params`) on
    FIT_IMAGES images (fits are cached). An attack that fails on a set gets blank panels and
    the reason in its row title instead of stopping the gallery.
    """
    use_style()
    sets = _datasets(seed)
    names = sorted(ATTACKS)
    n_cols = len(COLUMNS) * len(sets)
    height = 1.9 * len(names) + 1.0  # inches: rows plus the header
    fig, axes = plt.subplots(
        len(names),
        n_cols,
        figsize=(1.6 * n_cols, height),
        squeeze=False,
        gridspec_kw={"hspace": 0.4, "wspace": 0.08, "top": 1 - 1.0 / height, "bottom": 0.02},
    )
    for i, name in enumerate(names):
        notes: dict[str, list[str]] = {}  # error text -> image sets it happened on
        for j, (set_name, (images, labels)) in enumerate(sets.items()):
            cells = axes[i, j * len(COLUMNS) : (j + 1) * len(COLUMNS)]
            try:
                attack = _build(name, images, labels, seed)
                row = _example_row(attack, labels)
                shown = attack_examples(attack, images[row : row + 1], labels[row : row + 1], seed)
            except Exception as error:  # a gallery shows what runs and says what does not
                reason = f"{type(error).__name__}: {str(error)[:70]}"
                notes.setdefault(reason, []).append(set_name)
                for ax in cells:
                    ax.set_axis_off()
                continue
            for ax, image in zip(cells, shown, strict=True):
                _show(ax, image[0])
        kind = "clean-label" if ATTACKS[name].clean_label else "dirty-label"
        fitted = ", learned (quick fit)" if ATTACKS[name].needs_fit else ""
        skipped = [f"skipped on {' and '.join(on)}: {why}" for why, on in notes.items()]
        title = "\n".join([f"{name} ({kind}{fitted})", *skipped])
        label = axes[i, 0].annotate(
            title, (0, 1.04), xycoords="axes fraction", fontsize=8, ha="left", va="bottom"
        )
        label.set_in_layout(False)
    for j, set_name in enumerate(sets):
        for c, column in enumerate(COLUMNS):
            axes[0, j * len(COLUMNS) + c].set_title(f"{set_name}\n{column}", fontsize=8, pad=18)
    fig.suptitle(
        "attack gallery: real Fashion-MNIST (left), synthetic smooth random colour 32 px images "
        "(right; no CIFAR on this machine)\n|difference| scaled so its largest change is white",
        fontsize=10,
        y=1 - 0.05 / height,
    )
    return fig


def example_pairs(
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    amplified: torch.Tensor,
    captions: list[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Columns of (clean, poisoned, amplified |difference|) uint8 (N, C, H, W) images, as
    `eglib.poison.attack_examples` returns them; `captions`: one text per column."""
    if not clean.shape == poisoned.shape == amplified.shape or clean.dim() != 4 or not len(clean):
        raise ValueError(
            f"clean, poisoned and amplified must be equal-shape non-empty (N, C, H, W) batches; "
            f"got {tuple(clean.shape)}, {tuple(poisoned.shape)}, {tuple(amplified.shape)}"
        )
    if captions is not None and len(captions) != len(clean):
        raise ValueError(f"{len(captions)} captions for {len(clean)} images")
    use_style()
    n = len(clean)
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 4.8), squeeze=False)
    for j in range(n):
        for i, batch in enumerate((clean, poisoned, amplified)):
            _show(axes[i, j], batch[j].cpu())
        if captions is not None:
            axes[0, j].set_title(captions[j], fontsize=8)
    for i, name in enumerate(COLUMNS):
        axes[i, 0].set_ylabel(name.replace(" (", "\n("), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
