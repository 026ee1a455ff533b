"""What every study returns (`StudyResult`), the shape of a study module (`Study`), the
poison rate the studies give each attack (`attack_rate`), the names a command chooses
(`chosen_studies`), and the refusal to redraw a study from its tables (`NotRedrawable`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from matplotlib.figure import Figure

from eglib.poison import ATTACKS
from eglib.registry import lookup
from eglib.spectral import equal_count_subsample

if TYPE_CHECKING:
    import torch

    from eglib.experiments import ExperimentResult

POISON_RATE = 0.1
# Clean-label attacks poison only target-class images, a tenth of Fashion-MNIST: 10 % of the
# whole set would be every one of them (more than a subset holds), so they poison half.
CLEAN_LABEL_RATE = 0.05


def attack_rate(attack: str) -> float:
    """A study's poison rate of an attack: 10 %, or `CLEAN_LABEL_RATE` for clean-label ones."""
    return CLEAN_LABEL_RATE if lookup(ATTACKS, "attack", attack).clean_label else POISON_RATE


@dataclass
class StudyResult:
    """A finished study: plain-data table rows (the CSV) plus whatever its figures need.

    `rows`: one dict of plain values (numbers, strings, None) per table row. `data`: tensors,
    arrays or records for the figures (not written to disk). `notes`: plain facts worth
    keeping next to the figures (sample counts, k, stages), written into the study's JSON.
    """

    name: str
    profile: str
    rows: list[dict[str, Any]]
    seeds: tuple[int, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def chosen_studies(studies: Mapping[str, object], only: Sequence[str] | None) -> list[str]:
    """The study names of `only`, each once, in order (all of `studies` when None or empty);
    ValueError for an unknown one."""
    names = list(studies) if not only else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in studies]
    if unknown:
        raise ValueError(f"unknown study {unknown[0]!r}; allowed: {sorted(studies)}")
    return names


class NotRedrawable(ValueError):
    """A study whose figures need more than its saved tables hold (`eglib.studies.redraw`)."""


class Study(Protocol):
    """A study module: `run(profile, progress=...)` then `figures(result)` (suffix -> figure)."""

    def run(self, profile: str | None = None, *, progress: bool = True) -> StudyResult:
        """Train (through the cache) and measure; return rows and plot data."""
        ...

    def figures(self, result: StudyResult) -> dict[str, Figure]:
        """Figures by suffix: '' -> <name>.png, 'x' -> <name>_x.png."""
        ...


def paired_test_images(
    result: ExperimentResult, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean, triggered, source labels) of `count` seeded test images of a run (all of them
    when fewer), row i of the first two the same image without and with the trigger;
    ValueError for a run without an attack."""
    trig = result.data.triggered
    if trig is None:
        raise ValueError(f"run {result.config.key()} has no attack; no trigger to measure")
    n = min(count, len(trig.idx))
    chosen = equal_count_subsample([len(trig.idx)], count=n, seed=seed)[0]
    return (
        result.data.test_images[trig.idx[chosen]],
        trig.images[chosen],
        trig.source_labels[chosen],
    )
