"""Tests for the observation plots (rank curves, spectra, t-SNE, separation bars, gallery) on
small hand-made records: no training."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection

from eglib.plots import (
    attack_gallery,
    example_pairs,
    projection_tsne,
    rank_curves,
    separation_summary,
    singular_spectra,
    smooth_colour_images,
)
from eglib.plots import gallery as gallery_module
from eglib.plots.spectra import SPECTRUM_STYLES
from eglib.poison import attack_examples
from eglib.poison.badnets import BadNets
from eglib.poison.base import Attack

STAGES = ("stem", "layer1")


def _y(data: Any) -> np.ndarray:
    """A line's y data (or an image's array) as a float array."""
    return np.asarray(data, dtype=float)


ATTACKS = ("badnets", "blend")


def _rank_rows() -> list[dict]:
    rows = []
    for a, attack in enumerate(ATTACKS):
        for epoch in (1, 2, 3):
            row = {
                "attack": attack,
                "epoch": epoch,
                "acc": 0.5 + 0.1 * epoch,
                "asr": 0.3 * epoch,
                "rank_samples": 256.0,
            }
            for s, stage in enumerate(STAGES):
                for g, group in enumerate(("clean", "triggered", "diff")):
                    row[f"erank_{group}/{stage}"] = 100.0 * (a + 1) + 10 * s + g + epoch
                    row[f"srank_{group}/{stage}"] = 5.0 + g
            rows.append(row)
    return rows


def test_rank_curves_panels_lines_and_values() -> None:
    rows = _rank_rows()
    fig = rank_curves(rows)
    main = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert len(main) == len(ATTACKS) * len(STAGES)  # one panel per (attack, stage)
    assert len(fig.axes) == 2 * len(main)  # each with a twin ACC/ASR axis
    first = main[0]
    assert first.get_title() == "badnets - stem"
    lines = first.get_lines()
    assert [ln.get_label() for ln in lines] == ["clean f(x)", "triggered f(x+t)", "f(x+t) - f(x)"]
    np.testing.assert_allclose(_y(lines[1].get_ydata()), [102.0, 103.0, 104.0])
    twin_lines = [ln for ax in fig.axes if ax not in main for ln in ax.get_lines()]
    asr = [ln for ln in twin_lines if ln.get_label() == "ASR (%)"][0]
    np.testing.assert_allclose(_y(asr.get_ydata()), [30.0, 60.0, 90.0])
    assert "256" in fig.get_suptitle() and "equal counts" in fig.get_suptitle()
    plt.close(fig)


def test_rank_curves_by_optimizer_step_when_rows_carry_steps() -> None:
    rows = _rank_rows()
    for row in rows:
        row["step"] = 10 * row["epoch"]
    probe = {**rows[0], "epoch": 0.0, "step": 0, "asr": 1.0, "asr_correct": None}
    rows[0]["asr_correct"] = 0.25
    fig = rank_curves([probe, *rows])
    main = [ax for ax in fig.axes if ax.get_xlabel() == "optimizer step"]
    assert len(main) == len(ATTACKS) * len(STAGES) and main[0].get_xscale() == "symlog"
    lines = main[0].get_lines()
    np.testing.assert_allclose(_y(lines[0].get_xdata()), [0, 10, 20, 30])  # probe first
    marker = [ln for ln in lines if ln.get_label().startswith("_")]
    assert len(marker) == 1 and _y(marker[0].get_xdata())[0] == 10  # end of epoch 1
    blend = main[len(STAGES)].get_lines()  # the probe belongs to badnets only
    np.testing.assert_allclose(_y(blend[0].get_xdata()), [10, 20, 30])
    twin = [ax for ax in fig.axes if ax not in main][0]
    correct = [ln for ln in twin.get_lines() if ln.get_label() == "ASR, correct only (%)"]
    np.testing.assert_allclose(_y(correct[0].get_ydata()), [np.nan, 25, np.nan, np.nan])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "clean f(x)",
        "triggered f(x+t)",
        "f(x+t) - f(x)",
        "ACC (%)",
        "ASR (%)",
        "ASR, correct only (%)",
    ]
    assert "per optimizer step" in fig.get_suptitle()
    plt.close(fig)


def test_rank_curves_average_seeds_with_an_sd_band() -> None:
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for row in _rank_rows():
            row = {k: v + shift if k.startswith("erank_") else v for k, v in row.items()}
            rows.append({**row, "seed": seed, "asr_correct": None if seed else 0.5})
    fig = rank_curves(rows)
    main = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert len(main) == len(ATTACKS) * len(STAGES)
    lines = main[0].get_lines()
    np.testing.assert_allclose(_y(lines[1].get_ydata()), [103.0, 104.0, 105.0])  # mean of seeds
    band = main[0].collections[1].get_paths()[0].vertices[:, 1]  # triggered: mean +- sd
    sd = np.std([0.0, 2.0], ddof=1)
    assert band.min() == pytest.approx(103.0 - sd) and band.max() == pytest.approx(105.0 + sd)
    twin = [ax for ax in fig.axes if ax not in main][0]
    correct = [ln for ln in twin.get_lines() if ln.get_label() == "ASR, correct only (%)"]
    np.testing.assert_allclose(_y(correct[0].get_ydata()), [50.0, 50.0, 50.0])  # NaN skipped
    assert "mean of 2 seeds" in fig.get_suptitle()
    plt.close(fig)


def test_rank_curves_stable_and_bad_input() -> None:
    fig = rank_curves(_rank_rows(), measure="srank")
    main = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    np.testing.assert_allclose(_y(main[0].get_lines()[2].get_ydata()), [7.0, 7.0, 7.0])
    assert "stable rank" in fig.get_suptitle()
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown measure 'foo'"):
        rank_curves(_rank_rows(), measure="foo")
    with pytest.raises(ValueError, match="erank_clean"):
        rank_curves([{"attack": "x", "epoch": 1, "acc": 0.1, "asr": 0.2}])


def test_singular_spectra_normalised_log_panels() -> None:
    spectra = {  # each group its own spectrum, so a swapped group or style shows
        "clean": [4.0, 2.0, 1.0, 1.0],
        "triggered": [6.0, 1.0, 0.5, 0.5],
        "mixed": [5.0, 1.5, 1.0, 0.5],
        "diff": [7.0, 0.5, 0.25, 0.25],
    }
    records = [
        {
            "attack": a,
            "stage": s,
            "group": g,
            "spectrum": np.array(spectra[g]),
            "rows": 64,
            **({"poisoned_rows": 6} if g == "mixed" else {}),
        }
        for a in ATTACKS
        for s in STAGES
        for g in spectra
    ]
    fig = singular_spectra(records)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
        lines = {str(line.get_label()): line for line in ax.get_lines()}
        assert list(lines) == [
            "clean f(x)",
            "triggered f(x+t)",
            "mixed (6 of 64 rows triggered)",  # from the records, not a fixed 10 %
            "f(x+t) - f(x)",
        ]
        for line, (group, values) in zip(lines.values(), spectra.items(), strict=True):
            np.testing.assert_allclose(_y(line.get_ydata()), np.array(values) / sum(values))
            assert line.get_linestyle() == SPECTRUM_STYLES[group]
    assert "64 rows" in fig.get_suptitle()
    plt.close(fig)
    with pytest.raises(ValueError, match=r"groups of \[32, 64\] rows"):
        singular_spectra([*records, {**records[0], "group": "clean", "rows": 32}])
    with pytest.raises(ValueError, match="no spectrum"):
        singular_spectra([])


def test_projection_tsne_marks_poisoned() -> None:
    rng = np.random.default_rng(0)
    poisoned = np.zeros(30, dtype=bool)
    poisoned[:4] = True
    records = [
        {
            "attack": "badnets",
            "stage": s,
            "space": space,
            "xy": rng.normal(size=(30, 2)),
            "classes": rng.integers(0, 10, 30),
            "poisoned": poisoned,
            "caption": "kNN purity 0.90",
        }
        for s in STAGES
        for space in ("top-10", "tail")
    ]
    fig = projection_tsne(records)
    assert len(fig.axes) == 4
    ax = fig.axes[0]
    clean, marked = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(_y(clean.get_offsets())) == 26 and len(_y(marked.get_offsets())) == 4
    assert "top-10" in ax.get_title() and "kNN purity 0.90" in ax.get_title()
    assert "tail" in fig.axes[1].get_title()
    plt.close(fig)


def test_separation_summary_bars() -> None:
    rows = [
        {
            "attack": a,
            "stage": s,
            "k": 10,
            "energy_top_mixed": 0.9,
            "energy_top_clean": 0.2,
            "energy_random": 0.01,
            "knn_poison_top": 0.8,
            "knn_poison_tail": 0.1,
            "knn_poison_chance": 0.09,
            "knn_source_top": 0.2,
            "knn_source_tail": 0.7,
        }
        for a in ATTACKS
        for s in STAGES
    ]
    fig = separation_summary(rows)
    assert len(fig.axes) == 3
    heights = [sorted({round(p.get_height(), 3) for p in ax.patches}) for ax in fig.axes]  # type: ignore[attr-defined]
    assert heights == [[0.01, 0.2, 0.9], [0.09, 0.1, 0.8], [0.2, 0.7]]
    assert [len(ax.patches) for ax in fig.axes] == [12, 12, 8]
    assert "k = 10" in fig.get_suptitle()
    assert not any(ax.lines for ax in fig.axes) and "seed" not in fig.get_suptitle()
    plt.close(fig)


def test_separation_summary_averages_seeds_and_marks_each() -> None:
    rows = [
        {"attack": "badnets", "stage": s, "seed": seed, "k": 10, "energy_top_mixed": value}
        for s, values in (("stem", (0.1, 0.5)), ("layer1", (0.6, 0.8)))
        for seed, value in enumerate(values)
    ]
    fig = separation_summary(rows)
    energy = fig.axes[0]
    assert [round(p.get_height(), 3) for p in energy.patches] == [0.3, 0.7]  # type: ignore[attr-defined]
    [dots] = energy.lines
    assert list(_y(dots.get_ydata())) == [0.1, 0.5, 0.6, 0.8]
    assert list(_y(dots.get_xdata())) == [0, 0, 1, 1]
    assert [t.get_text() for t in energy.get_xticklabels()] == ["badnets\nstem", "badnets\nlayer1"]
    assert "mean of seeds 0, 1" in fig.get_suptitle()
    plt.close(fig)


def test_smooth_colour_images_are_seeded_and_smooth() -> None:
    images, labels = smooth_colour_images(16, seed=3)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and int(labels.max()) < 10
    again, _ = smooth_colour_images(16, seed=3)
    assert torch.equal(images, again)
    assert not torch.equal(images, smooth_colour_images(16, seed=4)[0])
    step = (images[..., 1:].float() - images[..., :-1].float()).abs().mean()
    noise = torch.randint(0, 256, images.shape).float()
    assert step < 0.2 * (noise[..., 1:] - noise[..., :-1]).abs().mean()  # smooth, not noise


class _Broken(Attack):
    name = "broken"

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        raise RuntimeError("no trigger today")


def test_attack_gallery_rows_and_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    sets = {
        "grey 28 px": (torch.full((8, 1, 28, 28), 40, dtype=torch.uint8), torch.arange(8) % 3),
        "colour 32 px": smooth_colour_images(8, seed=0),
    }
    monkeypatch.setattr(gallery_module, "_datasets", lambda seed: sets)
    monkeypatch.setattr(gallery_module, "ATTACKS", {"badnets": BadNets, "broken": _Broken})
    fig = attack_gallery(seed=0)
    assert len(fig.axes) == 2 * 6  # two attacks x (3 columns x 2 image sets)
    diff_panel = _y(fig.axes[2].get_images()[0].get_array())
    assert diff_panel.max() == 255 and (diff_panel > 0).sum() == 9  # the 3x3 square, amplified
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "badnets (dirty-label)" in notes
    assert "broken" in notes and "skipped" in notes and "no trigger today" in notes
    assert all(not ax.get_images() for ax in fig.axes[6:])  # the broken row stays blank
    assert "no CIFAR" in fig.get_suptitle()
    plt.close(fig)


def test_example_pairs_grid() -> None:
    images = torch.full((3, 1, 28, 28), 30, dtype=torch.uint8)
    shown = attack_examples(BadNets(), images, torch.tensor([1, 2, 3]), seed=0)
    fig = example_pairs(*shown, ["a", "b", "c"], title="pairs")
    assert len(fig.axes) == 9  # 3 rows (clean, poisoned, difference) x 3 images
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    assert fig.axes[0].get_ylabel() == "clean" and "difference" in fig.axes[6].get_ylabel()
    assert _y(fig.axes[3].get_images()[0].get_array()).max() == 255  # the white square
    plt.close(fig)
    with pytest.raises(ValueError, match="captions"):
        example_pairs(*shown, ["only one"])
    with pytest.raises(ValueError, match="equal-shape"):
        example_pairs(shown[0], shown[1][:2], shown[2])


def _tsne_record(classes: np.ndarray) -> dict[str, Any]:
    poisoned = np.zeros(len(classes), dtype=bool)
    poisoned[-3:] = True
    xy = np.random.default_rng(0).normal(size=(len(classes), 2))
    return {"attack": "a", "stage": "s", "space": "tail", "xy": xy, "classes": classes,
            "poisoned": poisoned}  # fmt: skip


def test_projection_tsne_gives_each_of_more_than_ten_classes_its_own_colour() -> None:
    """With `palette[c % 10]`, classes 0, 10 and 20 of CIFAR-100 / GTSRB shared a colour
    under a legend that says 'colour = class'."""
    classes = np.arange(45) % 43  # GTSRB: 43 classes; the last 3 rows are the triggered ones
    fig = projection_tsne([_tsne_record(classes)])
    clean, _ = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    rgb = [tuple(np.round(c[:3], 6)) for c in clean.get_facecolors()]
    assert len(set(rgb)) == 42  # rows 0..41 are clean, one colour per class
    assert len({rgb[0], rgb[10], rgb[20], rgb[30], rgb[40]}) == 5
    plt.close(fig)
    # ten classes or fewer keep the tab10 look
    fig = projection_tsne([_tsne_record(np.arange(13) % 10)])
    clean, _ = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    tab10 = matplotlib.colormaps["tab10"].colors
    np.testing.assert_allclose(clean.get_facecolors()[:10, :3], np.asarray(tab10)[:10])
    plt.close(fig)
    with pytest.raises(ValueError, match="classes"):
        projection_tsne([_tsne_record(np.array([0, -1, 2, 3]))])
