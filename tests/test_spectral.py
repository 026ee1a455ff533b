"""Spectral measures on matrices with known answers; feature capture; the rank tracker."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from eglib import spectral
from eglib.guard import insert_guard
from eglib.models import make_model
from eglib.models.base import StagedNet, StageInfo
from eglib.spectral import (
    RankTracker,
    capture_features,
    effective_rank,
    equal_count_subsample,
    singular_values,
    stable_rank,
    top_coordinates,
    top_right_basis,
    top_tail_projections,
    trigger_difference,
    tsne_embed,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_net() -> StagedNet:
    """'linear' (a conv with bias, no nonlinearity), 'relu' (conv + ReLU), then a linear head."""
    torch.manual_seed(0)
    stages = OrderedDict(
        linear=nn.Conv2d(1, 3, 3, padding=1),
        relu=nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
    )
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    info = [StageInfo("linear", 3, 1), StageInfo("relu", 4, 1)]
    return StagedNet(stages, head, info, num_classes=2, in_channels=1, default_guard_stage="relu")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 1, 6, 6) images with values in [0, 200] (room for an additive trigger)."""
    return torch.randint(0, 201, (n, 1, 6, 6), generator=_gen(seed), dtype=torch.uint8)


def _add_trigger(images: torch.Tensor) -> torch.Tensor:
    """Add 50 to a 2x2 corner patch: exactly additive on [0, 200] images."""
    out = images.clone()
    out[:, :, :2, :2] += 50
    return out


def test_singular_values_match_svdvals() -> None:
    for shape in [(7, 30), (30, 7), (5, 2, 3, 4)]:
        A = torch.randn(shape, generator=_gen(1))
        s = singular_values(A)
        assert s.dtype == torch.float64 and s.shape == (min(shape[0], A[0].numel()),)
        want = torch.linalg.svdvals(A.reshape(shape[0], -1).double())
        torch.testing.assert_close(s, want, rtol=1e-9, atol=1e-9)


def test_effective_rank_known_answers() -> None:
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, abs=1e-9)
    u, v = torch.randn(9, 1, generator=_gen(2)), torch.randn(1, 20, generator=_gen(3))
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-5)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # s = (3, 1)
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(entropy))
    A = torch.randn(12, 30, generator=_gen(4))
    assert effective_rank(3.5 * A) == pytest.approx(effective_rank(A), rel=1e-9)
    assert 1.0 < effective_rank(A) < 12.0
    assert effective_rank(torch.zeros(4, 5)) == 0.0


def test_stable_rank_known_answers() -> None:
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)
    assert stable_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(10.0 / 9.0)
    u, v = torch.randn(9, 1, generator=_gen(5)), torch.randn(1, 20, generator=_gen(6))
    assert stable_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    A = torch.randn(10, 4, 2, generator=_gen(7))
    assert stable_rank(A) == pytest.approx(
        float(A.square().sum() / torch.linalg.matrix_norm(A.reshape(10, 8), ord=2) ** 2), rel=1e-6
    )
    assert stable_rank(torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("shape", [(12, 40), (40, 6)])
def test_top_tail_projections_split_the_matrix(shape: tuple[int, int], center: bool) -> None:
    A = torch.randn(shape, generator=_gen(8)) + 2.0
    top, tail = top_tail_projections(A, 3, center=center)
    M = A.double() - A.double().mean(0) if center else A.double()
    _, s, Vh = torch.linalg.svd(M, full_matrices=False)
    V = Vh[:3].T
    torch.testing.assert_close(top.norm(dim=0), s[:3])  # column i of A V_k has norm s_i
    torch.testing.assert_close(M - tail, M @ V @ V.T)  # top part = projection on V_k
    torch.testing.assert_close(tail @ V, torch.zeros(shape[0], 3, dtype=torch.float64))
    total = top.square().sum() + tail.square().sum()
    torch.testing.assert_close(total, M.square().sum())  # the two parts are orthogonal
    basis = top_right_basis(A, 3, center=center)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(top @ basis.T + tail, M)
    torch.testing.assert_close(top_coordinates(A, 3, center=center), top)  # the top part alone


def test_top_tail_projections_rank_below_k_and_bad_k() -> None:
    A = torch.randn(8, 1, generator=_gen(9)) @ torch.randn(1, 10, generator=_gen(10))
    top, tail = top_tail_projections(A, 3)
    assert torch.isfinite(top).all() and (top[:, 1:] == 0).all()
    torch.testing.assert_close(tail, torch.zeros(8, 10, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="k=9"):
        top_tail_projections(A, 9)


@pytest.mark.parametrize("center", [False, True])
def test_planted_trigger_direction_lands_in_the_top_coordinates(center: bool) -> None:
    g = _gen(11)
    A = 0.3 * torch.randn(60, 50, generator=g)
    direction = torch.randn(50, generator=g)
    direction /= direction.norm()
    poisoned = torch.arange(60) < 10
    A[poisoned] += 8.0 * direction
    top, tail = top_tail_projections(A, 1, center=center)
    score = top[:, 0].abs()
    if center:
        score = (top[:, 0] - top[~poisoned, 0].median()).abs()
    assert score[poisoned].min() > 3 * score[~poisoned].max()
    along = (tail.float() @ direction).abs()
    assert along[poisoned].max() < 1.0  # the tail no longer carries the trigger


def test_equal_count_subsample() -> None:
    parts = equal_count_subsample([50, 8, 20], seed=3)
    assert [len(p) for p in parts] == [8, 8, 8]
    for part, size in zip(parts, [50, 8, 20], strict=True):
        assert torch.equal(part, part.sort().values) and len(part.unique()) == 8
        assert int(part.max()) < size
    assert torch.equal(parts[1], torch.arange(8))
    again = equal_count_subsample([50, 8, 20], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = equal_count_subsample([50, 8, 20], seed=4)
    assert not torch.equal(parts[0], other[0])
    assert [len(p) for p in equal_count_subsample([50, 8], count=5)] == [5, 5]
    with pytest.raises(ValueError, match="count=9"):
        equal_count_subsample([50, 8], count=9)


def test_capture_features_sees_what_the_next_stage_sees() -> None:
    model = _tiny_net().train()
    images = _images(10)
    features = capture_features(model, images, ["linear", "relu"], batch_size=4)
    x = images.float() / 255
    with torch.no_grad():
        linear = model.body["linear"](x)
        relu = model.body["relu"](linear)
    torch.testing.assert_close(features["linear"], linear)
    torch.testing.assert_close(features["relu"], relu)
    assert features["relu"].shape == (10, 4, 6, 6) and features["relu"].device.type == "cpu"
    assert model.training  # mode restored
    guard = insert_guard(model, at="linear", k=2, eval_mode="batch")
    guarded = capture_features(model, images, ["linear"], batch_size=10, eval_mode="batch")
    guarded = guarded["linear"]
    guard.eval()
    torch.testing.assert_close(guarded, guard(linear))


def test_capture_features_stops_before_the_head_and_validates() -> None:
    model = _tiny_net()
    model.head.register_forward_hook(lambda *_: pytest.fail("head ran"))
    capture_features(model, _images(3), ["linear"])
    with pytest.raises(KeyError, match=r"unknown feature 'nope'.*'linear'"):
        capture_features(model, _images(3), ["nope"])
    with pytest.raises(ValueError, match="uint8"):
        capture_features(model, _images(3).float(), ["linear"])


def test_trigger_difference_of_a_linear_stage_is_rank_one() -> None:
    model = _tiny_net()
    clean = _images(12)
    diff = trigger_difference(model, clean, _add_trigger(clean), ["linear", "relu"])
    assert diff["linear"].shape == (12, 3, 6, 6)
    torch.testing.assert_close(diff["linear"], diff["linear"][:1].expand(12, -1, -1, -1))
    assert effective_rank(diff["linear"]) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="pair up"):
        trigger_difference(model, clean, clean[:5], ["linear"])


def test_tsne_embed_subsamples_and_separates_clusters() -> None:
    g = _gen(12)
    X = torch.cat([torch.randn(40, 80, generator=g), torch.randn(40, 80, generator=g) + 6.0])
    indices, emb = tsne_embed(X, max_points=60, seed=1, perplexity=10)
    assert emb.shape == (60, 2) and len(indices.unique()) == 60
    assert torch.equal(indices, indices.sort().values)
    again_idx, again = tsne_embed(X, max_points=60, seed=1, perplexity=10)
    assert torch.equal(indices, again_idx) and torch.allclose(emb, again)
    first = indices < 40
    centre_gap = (emb[first].mean(0) - emb[~first].mean(0)).norm()
    spread = max(emb[first].std(0).norm(), emb[~first].std(0).norm())
    assert centre_gap > 2 * spread
    with pytest.raises(ValueError, match="perplexity=30"):
        tsne_embed(X[:20])


def test_rank_tracker_adds_ranks_at_equal_counts() -> None:
    model = _tiny_net()
    clean = _images(40)
    triggered = _add_trigger(clean)
    tracker = RankTracker(clean, triggered, ["linear", "relu"], n_samples=16, seed=0)
    row: dict[str, float] = {}
    tracker.on_epoch_end(model, 1, row)
    assert row["rank_samples"] == 16.0
    for group in ("clean", "triggered", "diff"):
        for stage in ("linear", "relu"):
            assert f"erank_{group}/{stage}" in row and f"srank_{group}/{stage}" in row
    assert row["erank_diff/linear"] == pytest.approx(1.0, abs=1e-3)
    assert row["srank_diff/linear"] == pytest.approx(1.0, abs=1e-3)
    assert row["erank_clean/linear"] > 3.0
    rows = equal_count_subsample([40], count=16, seed=0)[0]
    feats = capture_features(model, clean[rows], ["relu"])["relu"]
    assert row["erank_clean/relu"] == pytest.approx(effective_rank(feats), rel=1e-6)
    with pytest.raises(ValueError, match="pair up"):
        RankTracker(clean, triggered[:10], ["linear"])


def test_top_right_basis_of_a_large_matrix_is_randomized_exact_and_seeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above EXACT_MAX_SIDE on both sides the top-k basis comes from a seeded randomized SVD
    (a full eigh of a 6272-wide Gram took minutes per label at full scale): it spans the
    exact top-k subspace, repeats exactly, and leaves the global random state alone."""
    monkeypatch.setattr(spectral, "EXACT_MAX_SIDE", 100)  # a small matrix takes the same path
    gen = torch.Generator().manual_seed(0)
    n, d, k = 600, 400, 3
    planted = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]
    weights = torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.tensor([9.0, 6.0, 4.0])
    A = weights @ planted.T + torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.1
    calls: list[int] = []
    real = spectral._randomized_top_basis
    monkeypatch.setattr(
        spectral, "_randomized_top_basis", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    state = torch.get_rng_state()
    V = top_right_basis(A, k)
    assert calls and torch.equal(torch.get_rng_state(), state)
    exact = torch.linalg.svd(A, full_matrices=False).Vh[:k].T
    assert torch.linalg.svdvals(exact.T @ V).min() > 1 - 1e-9  # the same subspace
    assert torch.equal(top_right_basis(A, k), V)  # seeded
    coords = top_coordinates(A, k)
    torch.testing.assert_close(coords.norm(dim=0), torch.linalg.svdvals(A)[:k])
    monkeypatch.setattr(spectral, "EXACT_MAX_SIDE", 10_000)
    calls.clear()
    top_right_basis(A, k)
    assert not calls  # below the threshold: the exact route


def test_bad_spectra_and_batches_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN spectrum read as rank one, a negative one was accepted, an empty feature
    dimension gave effective rank 0, and NaN features on the randomized route failed inside
    torch's SVD ('failed to converge') instead of naming the NaN."""
    from eglib.spectral import effective_rank_of_spectrum, stable_rank_of_spectrum

    for rank_of in (effective_rank_of_spectrum, stable_rank_of_spectrum):
        with pytest.raises(ValueError, match="1 NaN"):
            rank_of(torch.tensor([3.0, math.nan]))
        with pytest.raises(ValueError, match="1 negative"):
            rank_of(torch.tensor([3.0, -1.0, 1.0]))
        with pytest.raises(ValueError, match="1-D"):
            rank_of(torch.ones(2, 2))
    for empty in (torch.zeros(0, 5), torch.zeros(4, 0)):
        with pytest.raises(ValueError, match="non-empty"):
            effective_rank(empty)
    monkeypatch.setattr(spectral, "EXACT_MAX_SIDE", 10)
    A = torch.randn(60, 50, generator=_gen())
    A[3, 4] = math.nan
    with pytest.raises(ValueError, match="1 NaN"):
        top_right_basis(A, 2)


@pytest.mark.parametrize("shape", [(40, 60), (60, 8)])
def test_centred_ranks_ignore_a_constant_offset(shape: tuple[int, int]) -> None:
    """Ranks were computed only uncentred, undocumented: a trigger that only shifts the mean
    of the features lowered the effective rank, so 'poisoned features are low rank' could be
    a mean-shift artefact. `center=True` subtracts the column mean over rows first."""
    n, d = shape
    A = torch.randn(n, d, generator=_gen(20))
    shifted = A + 5.0 * torch.randn(1, d, generator=_gen(21))  # every row moved the same way
    centred = A.double() - A.double().mean(0)
    for rank_of, want in (
        (effective_rank, spectral.effective_rank_of_spectrum),
        (stable_rank, spectral.stable_rank_of_spectrum),
    ):
        assert rank_of(A) == pytest.approx(want(torch.linalg.svdvals(A.double())), rel=1e-9)
        assert rank_of(A, center=True) == pytest.approx(
            want(torch.linalg.svdvals(centred)), rel=1e-9
        )
        assert rank_of(shifted, center=True) == pytest.approx(rank_of(A, center=True), rel=1e-5)
        assert rank_of(shifted) < 0.5 * rank_of(A)  # uncentred: the offset dominates
        # rows equal up to round-off: centring leaves noise, whose rank is not the data's
        same_rows = torch.randn(1, d, generator=_gen(22)).expand(n, -1) + 1e3
        assert rank_of(same_rows, center=True) == 0.0
        assert rank_of(torch.zeros(4, 5), center=True) == 0.0
        with pytest.raises(ValueError, match="center='yes'"):
            rank_of(A, center="yes")  # type: ignore[arg-type]


def test_rank_tracker_records_centred_ranks_beside_the_uncentred_ones() -> None:
    model = _tiny_net()
    clean = _images(40)
    tracker = RankTracker(clean, _add_trigger(clean), ["linear", "relu"], n_samples=16, seed=0)
    row: dict[str, float] = {}
    tracker.on_epoch_end(model, 1, row)
    rows = equal_count_subsample([40], count=16, seed=0)[0]
    clean_feats = capture_features(model, clean[rows], ["relu"])["relu"]
    diff = trigger_difference(model, clean[rows], _add_trigger(clean[rows]), ["relu"])["relu"]
    for group, feats in (("clean", clean_feats), ("diff", diff)):
        assert row[f"erank_{group}/relu"] == pytest.approx(effective_rank(feats), rel=1e-6)
        assert row[f"erank_centred_{group}/relu"] == pytest.approx(
            effective_rank(feats, center=True), rel=1e-6
        )
        assert row[f"srank_{group}/relu"] == pytest.approx(stable_rank(feats), rel=1e-6)
        assert row[f"srank_centred_{group}/relu"] == pytest.approx(
            stable_rank(feats, center=True), rel=1e-6
        )
    assert row["erank_centred_clean/relu"] != pytest.approx(row["erank_clean/relu"], rel=1e-3)
    # a linear stage's f(x + t) - f(x) is one vector repeated: rank one, nothing once centred
    assert row["erank_diff/linear"] == pytest.approx(1.0, abs=1e-3)
    assert row["erank_centred_diff/linear"] == 0.0
    measures = ("erank", "srank", "erank_centred", "srank_centred")
    groups = ("clean", "triggered", "diff")
    want = {f"{m}_{g}/{s}" for m in measures for g in groups for s in ("linear", "relu")}
    assert set(row) == want | {"rank_samples"}


def test_capture_features_uses_near_equal_batches_and_the_running_guards() -> None:
    """The last batch of range(0, N, batch_size) could hold 1 row: a guard filtering batch-wise
    then raised (B=1) or gave features that depended on batch_size. Batches are now near-equal
    and guards run on their running estimates unless `eval_mode='batch'` is asked for."""
    model = _tiny_net()
    guard = insert_guard(model, at="linear", k=2, eval_mode="batch")
    model.train()
    with torch.no_grad():
        model(_images(16, seed=5).float() / 255)  # running estimates
    images = _images(10)
    per_sample = capture_features(model, images, ["linear"], batch_size=10)["linear"]
    for size in (1, 3, 9):
        torch.testing.assert_close(
            capture_features(model, images, ["linear"], batch_size=size)["linear"], per_sample
        )
    assert guard.eval_mode == "batch" and model.training  # both restored
    as_two_fives = capture_features(model, images, ["linear"], batch_size=5, eval_mode="batch")
    nine = capture_features(model, images, ["linear"], batch_size=9, eval_mode="batch")
    torch.testing.assert_close(nine["linear"], as_two_fives["linear"])  # 5 + 5, not 9 + 1
    assert not torch.allclose(nine["linear"], per_sample)
    diff = trigger_difference(model, images, _add_trigger(images), ["linear"], batch_size=9)
    assert diff["linear"].shape == (10, 3, 6, 6)
    with pytest.raises(ValueError, match=r"eval_mode='both'.*'running', 'batch'"):
        capture_features(model, images, ["linear"], eval_mode="both")


def test_a_str_of_stages_is_refused_not_split_into_letters() -> None:
    """RankTracker(x, x, 'layer1') stored ('l', 'a', ...) and failed only after an epoch;
    capture_features(m, x, 'stem') failed with "unknown feature 's'"."""
    model, clean = _tiny_net(), _images(8)
    with pytest.raises(ValueError, match=r"stages='linear'.*list"):
        RankTracker(clean, clean, "linear")
    with pytest.raises(ValueError, match=r"stages='linear'.*list"):
        capture_features(model, clean, "linear")
    with pytest.raises(ValueError, match=r"stages=\['linear', 3\]"):
        capture_features(model, clean, ["linear", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="uint8"):
        RankTracker(clean.float(), clean.float(), ["linear"])  # before an epoch, not after


def test_counts_must_be_integers_and_say_so_with_a_value_error() -> None:
    """Bools and floats were taken as counts (sizes=[3.7, 4] silently truncated, count=True
    gave 1 row) or failed with a TypeError deep inside torch; NumPy integers still work."""
    import numpy as np

    model, clean = _tiny_net(), _images(8)
    for kwargs, name in (
        ({"n_samples": 2.5}, "n_samples=2.5"),
        ({"n_samples": True}, "n_samples=True"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
    ):
        with pytest.raises(ValueError, match=name):
            RankTracker(clean, clean, ["linear"], **kwargs)
    with pytest.raises(ValueError, match="batch_size=2.5"):
        capture_features(model, clean, ["linear"], batch_size=2.5)  # type: ignore[arg-type]
    for kwargs, name in (
        ({"sizes": [3.7, 4]}, r"sizes=\[3.7, 4\]"),
        ({"sizes": [3, True]}, r"sizes=\[3, True\]"),
        ({"sizes": [3, 4], "count": True}, "count=True"),
        ({"sizes": [3, 4], "count": 2.0}, "count=2.0"),
    ):
        with pytest.raises(ValueError, match=name):
            equal_count_subsample(**kwargs)  # type: ignore[arg-type]
    sizes = [np.int64(5), 4]
    assert [len(p) for p in equal_count_subsample(sizes, count=np.int64(3))] == [3, 3]
    with pytest.raises(ValueError, match="max_points=2.5"):
        tsne_embed(torch.randn(40, 3), max_points=2.5)  # type: ignore[arg-type]


def test_empty_spectra_and_numpy_k() -> None:
    """An empty spectrum had effective rank 0 but made stable rank raise a RuntimeError; k as
    a NumPy integer was refused with 'k=np.int64(3); must be an int in [1, 5]'."""
    import numpy as np

    from eglib.spectral import effective_rank_of_spectrum, stable_rank_of_spectrum

    for rank_of in (effective_rank_of_spectrum, stable_rank_of_spectrum):
        with pytest.raises(ValueError, match="empty"):
            rank_of(torch.tensor([]))
    A = torch.randn(5, 8, generator=_gen(23))
    torch.testing.assert_close(top_right_basis(A, np.int64(3)), top_right_basis(A, 3))
    assert top_coordinates(A, np.int64(2)).shape == (5, 2)
    with pytest.raises(ValueError, match=r"k=True; must be an int \(not a bool\) in \[1, 5\]"):
        top_right_basis(A, True)
    with pytest.raises(ValueError, match=r"k=np.int64\(9\); must be an int in \[1, 5\]"):
        top_right_basis(A, np.int64(9))


def test_capturing_features_leaves_each_submodule_in_its_own_mode() -> None:
    """capture_features restored the model's flag with model.train(flag), which sets every
    submodule: a training model with a frozen (eval-mode) BatchNorm came back with it in
    train mode, so its running statistics moved on the next batch."""
    torch.manual_seed(0)
    net = make_model("cnn-small", 10, in_channels=1).train()
    frozen = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)][0].eval()
    capture_features(net, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), ["layer1"])
    assert net.training and not frozen.training
