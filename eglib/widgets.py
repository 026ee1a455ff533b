"""The spectral explorer: an ipywidgets UI over trained backdoored models (one per attack).

Controls: the attack (which model), the layer (a stage of that model) and k. Views: the
singular spectra of a clean, a triggered and a mixed feature batch at that layer with k
marked; the mixed batch in 2-D, by PCA of its top-k coordinates and on its first two tail
directions (k + 1, k + 2), triggered rows marked; and ACC/ASR under the spec's three test
protocols of the model as trained and with a fresh EigenGuard(k) put after that layer at
test time.

Speed: the stages up to the layer run once per (attack, layer) and their features are
cached; a move of k only re-fits the guard's running statistics on cached features, runs
the stages after the layer and redraws the figure.
"""

from __future__ import annotations

import copy
import html
import io
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from eglib.config import torch_threads
from eglib.data import take_subset
from eglib.evaluate import EVAL_BATCH_SIZE, PROTOCOLS, evaluate_protocols, mixed_batches
from eglib.experiments import ExperimentResult
from eglib.guard import EigenGuard, is_identity_filter, remove_guard
from eglib.models.base import StagedNet
from eglib.params import check_int
from eglib.spectral import (
    capture_features,
    equal_count_subsample,
    flatten_rows,
    gram_eigh,
    singular_values,
    top_coordinates,
)

Metrics = dict[str, dict[str, float]]
K_LIMIT = 64  # the k slider never goes beyond this
LAYER_CACHE_SIZE = 4  # (attack, layer) feature caches kept at once (tens of MB each)
# torch threads while the explorer computes. Its work is many small operations (guard
# batches of ~64 rows, 64 x 64 eigh, convolutions of a few hundred small images) that gain
# little from a second thread, and when the cores are shared with other jobs, spinning
# OpenMP threads stall: on 2 busy cores a k move took about 1 s with one thread, 8-20 s
# with two.
RENDER_THREADS = 1
_CODE_BASE = torch.tensor([65536, 256, 1])  # row index <-> 3 uint8 "pixels"
# how the re-applied guard filters under each protocol
_PROTOCOL_NAMES = {
    "per_sample": "per-sample (running stats)",
    "mixed": "mixed batches",
    "pure": "pure batches",
}


@dataclass(frozen=True)
class _Triggered:
    """The triggered-set fields `evaluate_protocols` reads (images, targets, sources)."""

    images: torch.Tensor
    labels: torch.Tensor
    source_labels: torch.Tensor


@dataclass(frozen=True)
class _AttackSets:
    """The images one attack's model is probed with; all subsets seeded."""

    result: ExperimentResult
    spectra_clean: (
        torch.Tensor
    )  # (n, C, H, W) uint8: the clean test images behind spectra_triggered
    spectra_triggered: torch.Tensor  # the same images with the trigger
    spectra_labels: torch.Tensor  # (n,) their true classes
    mixed_triggered: torch.Tensor  # (n,) bool: rows of the mixed batch that are triggered
    eval_clean: torch.Tensor  # clean test images (stratified) for ACC
    eval_labels: torch.Tensor
    eval_triggered: _Triggered  # triggered test images for ASR
    calibration: torch.Tensor  # clean (unpoisoned) training images for the running statistics
    k_max: int

    @property
    def batch_size(self) -> int:
        """The run's training batch size: the batches of the guard's calibration (the mixed
        and pure protocols use `EVAL_BATCH_SIZE`, as the runs' records do)."""
        return self.result.config.batch_size


@dataclass(frozen=True)
class _LayerState:
    """What one (attack, layer) pair caches: spectra, mixed-batch coordinates, eval features."""

    spectra: dict[str, np.ndarray]  # 'clean' | 'triggered' | 'mixed' -> singular values
    coords: torch.Tensor  # (n, n) mixed batch in its right singular basis (U diag(s))
    table: torch.Tensor  # features of eval_clean, then of eval_triggered images
    calibration: torch.Tensor  # features of the calibration images


class _CachedPrefix(nn.Module):
    """A model from `layer` on, fed cached features of `layer`'s output instead of images.

    `evaluate_protocols` takes uint8 images; here each input "image" is a uint8 (3, 1, 1)
    code of a row of `table` (see `_row_codes`), so the protocols run unchanged while the
    stages up to `layer` never run again. `guard` filters the cached features first;
    `guards` holds every guard on the path, so the protocols switch their eval modes.
    """

    def __init__(self, model: StagedNet, layer: str, table: torch.Tensor, guard: nn.Module) -> None:
        super().__init__()
        later = model.stages[model.stages.index(layer) + 1 :]
        self.table = table  # a plain attribute: no copy into state_dict or onto a device
        self.layer = layer
        self.later = nn.ModuleDict({name: model.stage(name) for name in later})
        self.head = model.head
        path: dict[str, nn.Module] = {layer: guard}
        path.update({name: model.guards[name] for name in later if name in model.guards})
        self.guards = nn.ModuleDict(path)
        self.train(model.training)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits for float codes (B, 3, 1, 1) in [0, 1] (uint8 codes through `to_float`)."""
        rows = (codes.flatten(1) * 255).round().long().cpu() @ _CODE_BASE
        x = self.guards[self.layer](self.table[rows].to(codes.device))
        for name, stage in self.later.items():
            x = stage(x)
            if name in self.guards:
                x = self.guards[name](x)
        return self.head(x)


def _row_codes(start: int, count: int) -> torch.Tensor:
    """uint8 codes (count, 3, 1, 1) of rows start .. start + count - 1 (base-256 digits)."""
    rows = torch.arange(start, start + count)
    digits = (rows[:, None] // _CODE_BASE) % 256
    return digits.to(torch.uint8)[:, :, None, None]


def calibrate_running_stats(guard: EigenGuard, features: torch.Tensor, batch_size: int) -> None:
    """Set a guard's running statistics from batches of `features`, as training sets them.

    No gradients; the guard runs in train mode on near-equal batches of about `batch_size`
    rows with momentum 1/t at the t-th batch (a cumulative average, like BatchNorm with
    momentum=None), then goes back to eval mode with its own momentum. Like the guard's own
    update, each step re-truncates the running second moment to rank k, so beyond two
    batches the result is not the plain average's top-k and depends on the batches' order.
    """
    momentum = guard.momentum
    batches = torch.tensor_split(features, max(1, len(features) // batch_size))
    guard.train()
    try:
        with torch.no_grad():
            for t, batch in enumerate(batches):
                guard.momentum = 1.0 / (t + 1)
                guard(batch)
    finally:
        guard.momentum = momentum
        guard.eval()


def _smallest_batch(
    n_clean: int, triggered: _Triggered, n_calibration: int, batch_size: int, poison_rate: float
) -> int:
    """The fewest rows any guard batch gets: calibration (in batches of `batch_size`),
    'mixed' and 'pure' batches (of `EVAL_BATCH_SIZE`).

    A batch-wise guard needs k <= its batch's rows; the batches are those that
    `calibrate_running_stats` and `evaluate_protocols` build (their sizes do not depend on
    the seed).
    """
    n_trig = int((triggered.source_labels != triggered.labels).sum())  # the ones ASR counts
    mixed = mixed_batches(n_clean, n_trig, poison_rate, EVAL_BATCH_SIZE, torch.Generator())
    pure = [n // math.ceil(n / EVAL_BATCH_SIZE) for n in (n_clean, n_trig)]
    calibration = n_calibration // max(1, n_calibration // batch_size)
    return min(min(len(c) + len(t) for c, t in mixed), *pure, calibration)


def _top_plane(coords: torch.Tensor) -> np.ndarray:
    """2-D PCA coordinates (n, 2) of rows given by their k coordinates in the top subspace
    (second column zero when k = 1)."""
    dims = min(2, coords.shape[1])
    top = top_coordinates(coords, dims, center=True)
    return F.pad(top, (0, 2 - dims)).numpy()


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg canvas; the figure is not registered with pyplot)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


_TABLE_CSS = (
    ".eglib-metrics-table {border-collapse: collapse; margin: 4px 0}"
    " .eglib-metrics-table th, .eglib-metrics-table td {padding: 2px 12px; text-align: right}"
    " .eglib-metrics-table td:first-child {text-align: left}"
    " .eglib-metrics-table thead {border-bottom: 1px solid #888}"
    " .eglib-metrics-table caption {caption-side: top; text-align: left; font-size: 90%}"
)


def _metrics_table(metrics: dict[str, Metrics], caption: str) -> str:
    """An HTML table: one row per protocol, ACC and ASR (%) without and with the guard."""
    head = "".join(
        f"<th>{name}</th>" for name in ("protocol", "ACC", "ACC guarded", "ASR", "ASR guarded")
    )
    rows = "".join(
        f"<tr><td>{_PROTOCOL_NAMES[p]}</td>"
        + "".join(
            f"<td>{_percent(metrics[which][p][metric])}</td>"
            for metric in ("acc", "asr")
            for which in ("unguarded", "guarded")
        )
        + "</tr>"
        for p in PROTOCOLS
    )
    return (
        f"<style>{_TABLE_CSS}</style>"
        f'<table class="eglib-metrics-table"><caption>{html.escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


class SpectralExplorer:
    """Interactive view of the feature spectrum of backdoored models and of EigenGuard at k.

    `results` maps an attack name to a finished `ExperimentResult` of a backdoored run (one
    trained model each). `n_eval` rows make each spectral batch (clean, triggered, mixed:
    equal counts, since effective rank grows with the row count). `n_metrics` clean test
    images give ACC and `n_triggered` triggered ones ASR (the 'mixed' protocol seats each
    triggered image among (1 - rate) / rate clean ones, so its cost grows with
    `n_triggered` / rate); `n_metrics` clean training images calibrate the re-applied
    guard's running statistics (the per-sample protocol). `k` is the initial k; guard
    parameters other than k are EigenGuard's defaults.

    `widget` is the root VBox to display; `update()` re-renders for the controls' values;
    `last_metrics` ({'unguarded'|'guarded': {protocol: {'acc', 'asr'}}}), `figure` and
    `last_render_s` hold the last rendered state.
    """

    def __init__(
        self,
        results: Mapping[str, ExperimentResult],
        *,
        n_eval: int = 512,
        n_metrics: int = 256,
        n_triggered: int = 64,
        k: int = 8,
        seed: int = 0,
    ) -> None:
        if not isinstance(results, Mapping) or not results:
            raise ValueError(
                f"results={results!r}; pass a non-empty mapping {{attack name: ExperimentResult}}"
            )
        self.n_eval = check_int("n_eval", n_eval, 4)
        self.n_metrics = check_int("n_metrics", n_metrics, 2)
        self.n_triggered = check_int("n_triggered", n_triggered, 1)
        self.seed = check_int("seed", seed, 0)
        self._sets = {str(name): self._prepare(str(name), r) for name, r in results.items()}
        first = next(iter(self._sets.values()))
        check_int("k", k, 1, first.k_max)
        self._layers: OrderedDict[tuple[str, str], _LayerState] = OrderedDict()
        self._guarded: dict[tuple[str, str, int], Metrics] = {}
        self._unguarded: dict[str, Metrics] = {}
        self._quiet = False
        self.last_metrics: dict[str, Metrics] = {}
        self.figure: Figure | None = None
        self.last_render_s = float("nan")

        model = first.result.model
        self.attack_dropdown = widgets.Dropdown(options=list(self._sets), description="attack")
        self.layer_dropdown = widgets.Dropdown(
            options=list(model.stages), value=model.default_guard_stage, description="layer"
        )
        self.k_slider = widgets.IntSlider(
            value=k, min=1, max=first.k_max, description="k", continuous_update=False
        )
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.metrics_html = widgets.HTML()
        self.status = widgets.HTML()
        for control, name in (
            (self.attack_dropdown, "eglib-attack"),
            (self.layer_dropdown, "eglib-layer"),
            (self.k_slider, "eglib-k"),
            (self.image, "eglib-figure"),
            (self.metrics_html, "eglib-metrics"),
            (self.status, "eglib-status"),
        ):
            control.add_class(name)
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.attack_dropdown, self.layer_dropdown, self.k_slider]),
                self.image,
                self.metrics_html,
                self.status,
            ]
        )
        self.widget.add_class("eglib-explorer")
        self.attack_dropdown.observe(self._on_attack, names="value")
        self.layer_dropdown.observe(self._on_change, names="value")
        self.k_slider.observe(self._on_change, names="value")
        self.update()

    # ---- data -------------------------------------------------------------------------

    def _prepare(self, name: str, result: object) -> _AttackSets:
        """Validate one result and pick (seeded) the images its model is probed with."""
        if not isinstance(result, ExperimentResult):
            raise ValueError(
                f"results[{name!r}] is a {type(result).__name__}; expected an ExperimentResult "
                f"(from eglib.experiments.run_experiment)"
            )
        data, cfg = result.data, result.config
        if data.triggered is None or data.poisoned is None:
            raise ValueError(
                f"results[{name!r}] has no attack (config.attack={cfg.attack!r}); "
                f"the explorer needs backdoored runs"
            )
        trig = data.triggered
        n = min(self.n_eval, len(trig.idx))
        if n < 4:
            raise ValueError(
                f"results[{name!r}] has {len(trig.idx)} triggered test images; need >= 4"
            )
        rows = equal_count_subsample([len(trig.idx)], count=n, seed=self.seed)[0]
        generator = torch.Generator().manual_seed(self.seed)
        n_mixed = min(max(1, round(cfg.poison_rate * n)), n - 1)
        mixed = torch.zeros(n, dtype=torch.bool)
        mixed[torch.randperm(n, generator=generator)[:n_mixed]] = True
        eval_clean, eval_labels = take_subset(
            data.test_images,
            data.test_labels,
            min(self.n_metrics, len(data.test_labels)),
            self.seed,
        )
        n_trig = min(self.n_triggered, len(trig.labels))
        trig_rows = equal_count_subsample([len(trig.labels)], count=n_trig, seed=self.seed + 1)[0]
        clean_train = torch.ones(len(data.train_labels), dtype=torch.bool)
        clean_train[data.poisoned.poison_idx] = False
        clean_train[data.poisoned.noise_idx] = False
        calibration, _ = take_subset(
            data.train_images[clean_train],
            data.train_labels[clean_train],
            min(self.n_metrics, int(clean_train.sum())),
            self.seed,
        )
        eval_triggered = _Triggered(
            trig.images[trig_rows], trig.labels[trig_rows], trig.source_labels[trig_rows]
        )
        smallest = _smallest_batch(
            len(eval_labels), eval_triggered, len(calibration), cfg.batch_size, cfg.poison_rate
        )
        if smallest < 2:
            raise ValueError(
                f"results[{name!r}]: batch_size={cfg.batch_size}, n_metrics={self.n_metrics} "
                f"and n_triggered={self.n_triggered} leave guard batches of {smallest} row(s); "
                f"a batch-wise guard needs >= 2"
            )
        return _AttackSets(
            result=result,
            spectra_clean=data.test_images[trig.idx[rows]],
            spectra_triggered=trig.images[rows],
            spectra_labels=trig.source_labels[rows],
            mixed_triggered=mixed,
            eval_clean=eval_clean,
            eval_labels=eval_labels,
            eval_triggered=eval_triggered,
            calibration=calibration,
            k_max=min(K_LIMIT, smallest, n - 2),  # k + 2 <= n: two tail directions to show
        )

    def _layer_state(self, attack: str, layer: str) -> _LayerState:
        """Features at `layer` (captured once, LRU-cached), their spectra and coordinates."""
        key = (attack, layer)
        if key in self._layers:
            self._layers.move_to_end(key)
            return self._layers[key]
        sets = self._sets[attack]
        model = sets.result.model
        if layer in model.guards:  # the re-applied guard replaces it: probe what it would see
            model = copy.deepcopy(model)
            remove_guard(model, layer)
        images = [
            sets.spectra_clean,
            sets.spectra_triggered,
            sets.eval_clean,
            sets.eval_triggered.images,
            sets.calibration,
        ]
        features = capture_features(model, torch.cat(images), [layer])[layer]
        clean, triggered, eval_clean, eval_trig, calibration = features.split(
            [len(x) for x in images]
        )
        mask = sets.mixed_triggered.view(-1, *[1] * (clean.dim() - 1))
        s_mixed, U = gram_eigh(flatten_rows(torch.where(mask, triggered, clean)))
        state = _LayerState(
            spectra={
                "clean": singular_values(clean).numpy(),
                "triggered": singular_values(triggered).numpy(),
                "mixed": s_mixed.numpy(),
            },
            coords=U * s_mixed,
            table=torch.cat([eval_clean, eval_trig]),
            calibration=calibration.clone(),
        )
        self._layers[key] = state
        while len(self._layers) > LAYER_CACHE_SIZE:
            self._layers.popitem(last=False)
        return state

    def _as_trained(self, attack: str) -> Metrics:
        """ACC/ASR under the three protocols of the model as trained, end to end on the images:
        a guard it was trained with stays in place and sees each protocol's batches."""
        sets = self._sets[attack]
        return evaluate_protocols(
            sets.result.model,
            sets.eval_clean,
            sets.eval_labels,
            sets.eval_triggered,
            poison_rate=sets.result.config.poison_rate,
            batch_size=EVAL_BATCH_SIZE,
            seed=self.seed,
        )

    def _metrics(self, attack: str, layer: str, state: _LayerState, k: int) -> Metrics:
        """ACC/ASR under the three protocols with EigenGuard(k) put after `layer` (replacing a
        guard the model has there; guards the model has before `layer` run per sample, as
        they did when the features were captured). At a k where EigenGuard is the identity
        (k = 1: s_1 set to s_1) that is the layer's features as they are."""
        sets = self._sets[attack]
        guard: nn.Module = nn.Identity()
        if not is_identity_filter(k):
            guard = EigenGuard(k)
            calibrate_running_stats(guard, state.calibration, sets.batch_size)
        n_clean = len(sets.eval_clean)
        trig = sets.eval_triggered
        return evaluate_protocols(
            _CachedPrefix(sets.result.model, layer, state.table, guard),
            _row_codes(0, n_clean),
            sets.eval_labels,
            _Triggered(_row_codes(n_clean, len(trig.labels)), trig.labels, trig.source_labels),
            poison_rate=sets.result.config.poison_rate,
            batch_size=EVAL_BATCH_SIZE,
            seed=self.seed,
        )

    # ---- rendering --------------------------------------------------------------------

    def _figure(self, attack: str, layer: str, k: int, state: _LayerState) -> Figure:
        """Spectra with k marked; the mixed batch in its top-k subspace and on tail directions."""
        sets = self._sets[attack]
        fig = Figure(figsize=(13, 3.9), dpi=80)  # fixed margins: a layout engine costs 0.2 s
        fig.subplots_adjust(left=0.055, right=0.995, bottom=0.13, top=0.85, wspace=0.1)
        ax_spec, ax_top, ax_tail = fig.subplots(1, 3)
        for group, color in (("clean", "tab:blue"), ("triggered", "tab:red"), ("mixed", "0.3")):
            s = state.spectra[group]
            ax_spec.loglog(np.arange(1, len(s) + 1), s / s[0], color=color, lw=1.4, label=group)
        ax_spec.axvline(k, color="tab:green", ls="--", lw=1.2, label=f"k = {k}")
        ax_spec.set_ylim(bottom=1e-4)
        ax_spec.set_xlabel("index i of the singular value")
        ax_spec.set_ylabel("s_i / s_1")
        ax_spec.set_title(f"singular spectra ({len(sets.spectra_labels)} rows each)")
        ax_spec.legend(fontsize=8)
        mask = sets.mixed_triggered.numpy()
        labels = sets.spectra_labels.numpy()
        views = (
            (ax_top, _top_plane(state.coords[:, :k]), f"top-{k} subspace (PCA)"),
            (ax_tail, state.coords[:, k : k + 2].numpy(), f"tail: directions {k + 1} and {k + 2}"),
        )
        for ax, xy, title in views:
            ax.scatter(
                *xy[~mask].T,
                c=labels[~mask],
                cmap="tab10",
                vmin=0,
                vmax=9,
                s=7,
                alpha=0.5,
                label="clean (colour: class)",
            )
            ax.scatter(*xy[mask].T, c="k", marker="x", s=22, lw=1.2, label="triggered")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_top.legend(fontsize=8, loc="best")
        fig.suptitle(
            f"{attack} model, features after {layer}; mixed batch: {int(mask.sum())} of "
            f"{len(mask)} rows triggered",
            fontsize=11,
        )
        return fig

    def update(self) -> None:
        """Re-render the figure and the ACC/ASR table for the controls' current values."""
        start = time.perf_counter()
        attack, layer, k = (
            self.attack_dropdown.value,
            self.layer_dropdown.value,
            self.k_slider.value,
        )
        with torch_threads(RENDER_THREADS):
            state = self._layer_state(attack, layer)
            if attack not in self._unguarded:
                self._unguarded[attack] = self._as_trained(attack)
            if (attack, layer, k) not in self._guarded:
                self._guarded[(attack, layer, k)] = self._metrics(attack, layer, state, k)
        metrics = {
            "unguarded": self._unguarded[attack],
            "guarded": self._guarded[(attack, layer, k)],
        }
        fig = self._figure(attack, layer, k, state)
        self.image.value = _png(fig)
        sets = self._sets[attack]
        caption = (
            f"ACC / ASR (%) of the {attack} model as trained, and guarded: EigenGuard(k={k}) "
            f"{'(the identity at k = 1) ' if is_identity_filter(k) else ''}"
            f"put after {layer} at test time ({len(sets.eval_labels)} clean, "
            f"{len(sets.eval_triggered.labels)} triggered test images)"
        )
        self.metrics_html.value = _metrics_table(metrics, caption)
        self.figure, self.last_metrics = fig, metrics
        self.last_render_s = time.perf_counter() - start
        self.status.value = f"<small>rendered in {self.last_render_s:.2f} s</small>"

    # ---- callbacks --------------------------------------------------------------------

    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Within the block, control changes do not re-render."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _guarded_call(self, action: Callable[[], None]) -> None:
        """Run a re-render; show an error in the status line (then re-raise) if it fails."""
        try:
            action()
        except Exception as error:
            self.status.value = (
                f'<span style="color:#b00">error: {html.escape(f"{type(error).__name__}: {error}")}'
                "</span>"
            )
            raise

    def _on_change(self, change: dict[str, Any]) -> None:
        """A layer or k change: re-render."""
        if not self._quiet:
            self._guarded_call(self.update)

    def _on_attack(self, change: dict[str, Any]) -> None:
        """An attack change: offer that model's stages and k range, then re-render."""
        sets = self._sets[change["new"]]
        model = sets.result.model
        with self._hold():
            layer = self.layer_dropdown.value
            self.layer_dropdown.options = list(model.stages)
            self.layer_dropdown.value = (
                layer if layer in model.stages else model.default_guard_stage
            )
            self.k_slider.max = sets.k_max
        self._guarded_call(self.update)
