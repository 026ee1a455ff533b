"""The spectral explorer, driven through its widgets on tiny fake runs (no training)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from eglib import widgets
from eglib.data import to_float
from eglib.evaluate import EVAL_BATCH_SIZE, evaluate_protocols
from eglib.experiments import ExperimentConfig, ExperimentData, ExperimentResult
from eglib.guard import EigenGuard, insert_guard
from eglib.models.base import StagedNet, StageInfo
from eglib.poison import PoisonedSet, TriggeredSet
from eglib.spectral import capture_features
from eglib.widgets import SpectralExplorer, calibrate_running_stats

SIZE = 12  # image side
CLASSES = 4


def tiny_net(seed: int) -> StagedNet:
    """An untrained 3-stage conv net (no BatchNorm: its predictions vary with the input)."""
    torch.manual_seed(seed)
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),
        layer1=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        layer2=nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
    )
    info = [StageInfo("stem", 8, 1), StageInfo("layer1", 8, 1), StageInfo("layer2", 16, 2)]
    head = nn.Sequential(nn.Flatten(), nn.Linear(16 * (SIZE // 2) ** 2, CLASSES))
    return StagedNet(stages, head, info, CLASSES, 1, default_guard_stage="layer1").eval()


def fake_result(attack: str, seed: int, *, with_attack: bool = True) -> ExperimentResult:
    """A run of `tiny_net` on random 12x12 images; trigger: a bright 3x3 corner, target 0."""
    gen = torch.Generator().manual_seed(seed)
    train_x = torch.randint(0, 256, (160, 1, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    train_y = torch.arange(160) % CLASSES
    test_x = torch.randint(0, 256, (80, 1, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    test_y = torch.arange(80) % CLASSES
    cfg = ExperimentConfig(attack=attack if with_attack else None, batch_size=32, seed=seed)
    poisoned = triggered = None
    if with_attack:
        idx = (test_y != 0).nonzero().squeeze(1)
        stamped = test_x[idx].clone()
        stamped[:, :, -3:, :3] = 255
        triggered = TriggeredSet(stamped, torch.zeros(len(idx), dtype=torch.long), test_y[idx], idx)
        poison_idx = torch.arange(1, 160, 10)
        poisoned = PoisonedSet(train_x, train_y, train_y.clone(), poison_idx, attack, {})
    data = ExperimentData(
        poisoned=poisoned,
        train_images=train_x,
        train_labels=train_y,
        reserve_images=train_x[:8],
        reserve_labels=train_y[:8],
        test_images=test_x,
        test_labels=test_y,
        triggered=triggered,
    )
    return ExperimentResult(cfg, {}, tiny_net(seed), data)


def assert_metrics_close(
    got: dict[str, dict[str, float]], want: dict[str, dict[str, float]]
) -> None:
    assert set(got) == set(want)
    for protocol, values in want.items():
        assert got[protocol] == pytest.approx(values), protocol


@pytest.fixture(scope="module")
def results() -> dict[str, ExperimentResult]:
    return {"badnets": fake_result("badnets", 0), "blend": fake_result("blend", 1)}


def make_explorer(results: dict[str, ExperimentResult], **kwargs: Any) -> SpectralExplorer:
    return SpectralExplorer(results, n_eval=24, n_metrics=32, n_triggered=16, **kwargs)


def guard_line_x(explorer: SpectralExplorer) -> float:
    """Where the spectrum panel marks k."""
    assert explorer.figure is not None
    marker = [
        line for line in explorer.figure.axes[0].lines if str(line.get_label()).startswith("k =")
    ]
    return float(np.asarray(marker[0].get_xdata())[0])


def test_initial_render(results: dict[str, ExperimentResult]) -> None:
    explorer = make_explorer(results, k=3)
    assert explorer.widget.children[1] is explorer.image
    png = explorer.image.value
    assert isinstance(png, (bytes, memoryview)) and bytes(png).startswith(b"\x89PNG")
    assert guard_line_x(explorer) == 3
    assert set(explorer.last_metrics) == {"unguarded", "guarded"}
    for metrics in explorer.last_metrics.values():
        assert set(metrics) == {"per_sample", "mixed", "pure"}
        assert all(0.0 <= v <= 1.0 for m in metrics.values() for v in m.values())
    # without a guard the protocols only differ in which triggered images mixed batches hold
    unguarded = explorer.last_metrics["unguarded"]
    assert unguarded["per_sample"] == unguarded["pure"]
    assert unguarded["mixed"]["acc"] == unguarded["pure"]["acc"]
    assert "<table" in explorer.metrics_html.value and "ASR guarded" in explorer.metrics_html.value
    # the smallest guard batch: the pure batch of the 16 triggered images
    assert explorer.k_slider.max == 16
    assert explorer.layer_dropdown.value == "layer1"  # the model's default guard stage


def reference_metrics(result: ExperimentResult, explorer: SpectralExplorer, layer: str, k: int):
    """ACC/ASR of a deep copy of the model with insert_guard, on images end to end."""
    sets = explorer._sets[next(n for n, s in explorer._sets.items() if s.result is result)]
    model = copy.deepcopy(result.model)
    calibration = capture_features(model, sets.calibration, [layer])[layer]
    guard = insert_guard(model, at=layer, k=k)
    calibrate_running_stats(guard, calibration, result.config.batch_size)
    return end_to_end(model, result, sets)


def end_to_end(model: nn.Module, result: ExperimentResult, sets: Any) -> dict:
    """ACC/ASR of `model` under the three protocols on the explorer's evaluation images."""
    return evaluate_protocols(
        model,
        sets.eval_clean,
        sets.eval_labels,
        sets.eval_triggered,
        poison_rate=result.config.poison_rate,
        batch_size=EVAL_BATCH_SIZE,
        seed=0,
    )


def test_slider_and_layer_moves_rerender_with_guarded_metrics(
    results: dict[str, ExperimentResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    captures: list[tuple[str, ...]] = []
    real_capture: Callable[..., dict[str, torch.Tensor]] = widgets.capture_features

    def counting_capture(model: Any, images: torch.Tensor, stages: Any, **kw: Any) -> Any:
        captures.append(tuple(stages))
        return real_capture(model, images, stages, **kw)

    monkeypatch.setattr(widgets, "capture_features", counting_capture)
    explorer = make_explorer(results, k=1)
    png, metrics = explorer.image.value, explorer.last_metrics
    # rule 'kth' at k = 1 sets s_1 to s_1: the guard changes nothing
    assert_metrics_close(metrics["guarded"], metrics["unguarded"])

    explorer.k_slider.value = 16  # the largest k: every guard batch is still big enough
    assert guard_line_x(explorer) == 16
    assert explorer.image.value != png
    assert explorer.last_metrics["guarded"] != metrics["guarded"]
    assert_metrics_close(
        explorer.last_metrics["guarded"],
        reference_metrics(results["badnets"], explorer, "layer1", 16),
    )
    assert captures == [("layer1",)]  # k moves reuse the cached features

    explorer.layer_dropdown.value = "layer2"
    assert explorer.figure is not None and "after layer2" in explorer.figure.get_suptitle()
    assert_metrics_close(
        explorer.last_metrics["guarded"],
        reference_metrics(results["badnets"], explorer, "layer2", 16),
    )
    explorer.layer_dropdown.value = "layer1"
    assert captures == [("layer1",), ("layer2",)]
    assert explorer.last_render_s < 10


def test_as_trained_column_of_a_guarded_model_is_the_model_end_to_end() -> None:
    """A model trained with a guard: 'unguarded' (the model as trained) keeps that guard, in
    each protocol's mode, at every layer; it was the model without the guard at the guard's
    layer, frozen at the first layer viewed, and per-sample-only under mixed/pure."""
    result = fake_result("badnets", 0)
    train = result.data.train_images[:64]
    calibration = capture_features(result.model, train, ["stem"])["stem"]
    guard = insert_guard(result.model, at="stem", k=16, rule="remove")
    calibrate_running_stats(guard, calibration, result.config.batch_size)
    explorer = make_explorer({"badnets": result}, k=2)
    want = end_to_end(result.model, result, explorer._sets["badnets"])
    assert want["mixed"] != want["per_sample"]  # the batch-wise guard acts on mixed batches
    for layer in ("stem", "layer2", "layer1"):
        explorer._unguarded.clear()
        explorer.layer_dropdown.value = layer
        assert_metrics_close(explorer.last_metrics["unguarded"], want)


def test_attack_change_switches_model(results: dict[str, ExperimentResult]) -> None:
    explorer = make_explorer(results)
    before = explorer.last_metrics
    explorer.attack_dropdown.value = "blend"
    assert explorer.figure is not None
    assert explorer.figure.get_suptitle().startswith("blend model")
    assert explorer.last_metrics != before
    assert_metrics_close(
        explorer.last_metrics["guarded"], reference_metrics(results["blend"], explorer, "layer1", 8)
    )


def test_calibration_over_two_batches_is_their_plain_average() -> None:
    """Order-free for two batches; beyond two the rank-k re-truncation makes it order-dependent
    (the docstring says so)."""
    torch.manual_seed(0)
    a, b = torch.randn(20, 30), torch.randn(20, 30) * 3
    forward, backward = EigenGuard(4), EigenGuard(4)
    calibrate_running_stats(forward, torch.cat([a, b]), 20)
    calibrate_running_stats(backward, torch.cat([b, a]), 20)

    def moment(g: EigenGuard) -> torch.Tensor:
        return (g.running_basis * g.running_scale**2) @ g.running_basis.T

    assert torch.allclose(moment(forward), moment(backward), atol=1e-4)
    assert forward.momentum == 0.1 and not forward.training
    assert int(forward.num_batches_tracked) == 2


def test_row_codes_round_trip() -> None:
    rows = torch.tensor([0, 1, 255, 256, 65535, 65536, 70001])
    codes = torch.cat([widgets._row_codes(int(r), 1) for r in rows])
    assert codes.dtype == torch.uint8 and codes.shape == (7, 3, 1, 1)
    decoded = (to_float(codes).flatten(1) * 255).round().long() @ widgets._CODE_BASE
    assert torch.equal(decoded, rows)


@pytest.mark.parametrize(
    ("make_args", "match"),
    [
        (lambda r: ({},), "non-empty mapping"),
        (lambda r: ([r["badnets"]],), "non-empty mapping"),
        (lambda r: ({"badnets": "model.pt"},), "expected an ExperimentResult"),
        (lambda r: ({"clean": fake_result("x", 2, with_attack=False)},), "no attack"),
    ],
)
def test_bad_results_raise(
    results: dict[str, ExperimentResult], make_args: Callable[..., tuple[Any]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SpectralExplorer(*make_args(results))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_eval": 1}, "n_eval=1"),
        ({"n_metrics": 0}, "n_metrics=0"),
        ({"k": 0}, r"k=0; must be an int in \[1, 16\]"),
        ({"k": 17}, "k=17"),
        ({"n_triggered": 0}, "n_triggered=0"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_options_raise(
    results: dict[str, ExperimentResult], kwargs: dict[str, int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SpectralExplorer(results, **{"n_eval": 24, "n_metrics": 32, "n_triggered": 16, **kwargs})


def test_batches_too_small_for_a_guard_raise(results: dict[str, ExperimentResult]) -> None:
    # one triggered evaluation image: a pure batch of 1 row
    with pytest.raises(ValueError, match="guard batches of 1 row"):
        SpectralExplorer({"badnets": results["badnets"]}, n_eval=24, n_metrics=32, n_triggered=1)


def test_the_explorer_leaves_a_models_batchnorm_in_eval_mode() -> None:
    """The explorer wraps the model's later stages in a module created in train mode; the
    protocols then restored that wrapper's flag recursively, so the (eval-mode) model's
    BatchNorm layers ran in train mode ever after and later predictions moved their
    running statistics."""
    result = fake_result("badnets", 0)
    result.model.body["layer2"].append(nn.BatchNorm2d(16))
    result.model.eval()
    make_explorer({"badnets": result}, k=2)
    assert [n for n, m in result.model.named_modules() if m.training] == []
    mean = result.model.body["layer2"][-1].running_mean.clone()
    with torch.no_grad():
        result.model(result.data.test_images[:8].float() / 255)
    assert torch.equal(result.model.body["layer2"][-1].running_mean, mean)
