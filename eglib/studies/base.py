"""What every study returns (`StudyResult`), and the shape of a study module (`Study`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from matplotlib.figure import Figure


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


class Study(Protocol):
    """A study module: `run(profile, progress=...)` then `figures(result)` (suffix -> figure)."""

    def run(self, profile: str | None = None, *, progress: bool = True) -> StudyResult:
        """Train (through the cache) and measure; return rows and plot data."""
        ...

    def figures(self, result: StudyResult) -> dict[str, Figure]:
        """Figures by suffix: '' -> <name>.png, 'x' -> <name>_x.png."""
        ...
