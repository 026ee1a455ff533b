"""Tests of the baseline defences and the poison detectors, on tiny synthetic cases."""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from eglib.data import to_float
from eglib.defenses import DEFENSES, DefenseContext, make_defense
from eglib.defenses.abl import lga_loss
from eglib.defenses.anp import (
    AdversarialNeuronPruning,
    NeuronPerturbation,
    prune_channels,
    pruning_order,
)
from eglib.defenses.detection import (
    detection_report,
    detection_table,
    detector_names,
    evaluate_detectors,
    make_detector,
    score_samples,
)
from eglib.defenses.filtering import remove_top_fraction
from eglib.defenses.nad import attention_loss, stage_outputs
from eglib.models import make_model
from eglib.models.base import StagedNet, StageInfo
from eglib.train import TrainSettings, train_model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded (the CI machine's 2 cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Synthetic features: Gaussian clusters per label, a shifted group planted in label 0
# ---------------------------------------------------------------------------------------------


def planted_features(
    planted_share: float,
    n_per_label: int = 200,
    n_labels: int = 4,
    dim: int = 16,
    shift: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, dim), labels (N,), planted indices): label 0 holds a shifted group."""
    g = torch.Generator().manual_seed(0)
    means = 6.0 * torch.randn(n_labels, dim, generator=g)
    labels = torch.arange(n_labels).repeat_interleave(n_per_label)
    features = means[labels] + torch.randn(len(labels), dim, generator=g)
    planted = torch.arange(int(planted_share * n_per_label))  # label 0 comes first
    direction = torch.randn(dim, generator=g)
    features[planted] += shift * direction / direction.norm()
    return features, labels, planted


@pytest.mark.parametrize("name", ["ss", "spectre", "eigenguard-score"])
def test_score_detectors_find_planted_minority(name: str) -> None:
    features, labels, planted = planted_features(0.1)
    scores = score_samples(name, features, labels)
    assert scores.shape == (len(labels),)
    report = detection_report(scores, planted, torch.zeros(len(labels), dtype=torch.bool))
    assert report["auroc"] > 0.95


def test_ss_ranks_like_eigenguard_score_k1_per_label() -> None:
    features, labels, _ = planted_features(0.1)
    ss = score_samples("ss", features, labels)
    eg = score_samples("eigenguard-score", features, labels, k=1, per_label=True)
    torch.testing.assert_close(ss, eg.square())


def test_ss_removes_top_fraction_per_label() -> None:
    features, labels, planted = planted_features(0.1)
    found = make_detector("ss", rate_guess=0.1).detect(features, labels)
    # 1.5 * 0.1 of each label of 200 = 30 per label, and all 20 planted among label 0's
    assert found.removed.view(4, 200).sum(1).tolist() == [30, 30, 30, 30]
    assert bool(found.removed[planted].all())


def _global_top_norms(features: torch.Tensor, k: int) -> torch.Tensor:
    """Norms (N,) of the rows' coordinates on the top-k principal axes of ALL the rows."""
    centred = features.double() - features.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:k].T).norm(dim=1)


def test_eigenguard_score_overall_centres_scores_and_removes_over_all_samples() -> None:
    # four labels with far-apart means: over all samples the top axes are the ones between the
    # label means, so the overall scores (and removals) differ from the per-label ones
    features, labels, _ = planted_features(0.1)
    detector = make_detector("eigenguard-score", k=2, per_label=False, rate_guess=0.1)
    found = detector.detect(features, labels)
    expected = _global_top_norms(features, k=2)
    torch.testing.assert_close(found.scores, expected)
    per_label = score_samples("eigenguard-score", features, labels, k=2, per_label=True)
    assert not torch.allclose(found.scores, per_label, rtol=0.1)
    # the top 15 % of all 800 samples, wherever their labels: not 30 per label
    removed = torch.zeros(len(labels), dtype=torch.bool)
    removed[expected.topk(120).indices] = True
    assert torch.equal(found.removed, removed)
    assert found.removed.view(4, 200).sum(1).tolist() != [30, 30, 30, 30]


def test_filters_remove_the_rounded_fraction_per_label_and_overall() -> None:
    # removal_factor * rate_guess = 0.15 of labels of 7 and 13 samples: 1.05 and 1.95, so
    # round gives 1 and 2 (floor 1 and 1, ceil 2 and 2); over all 20 samples 3.0000000000000004
    # (float round-off): round 3, ceil 4
    features, labels, _ = planted_features(0.0, n_per_label=20, n_labels=1)
    labels = (torch.arange(20) >= 7).long()
    for name in ("ss", "spectre"):
        found = make_detector(name, rate_guess=0.1, removal_factor=1.5).detect(features, labels)
        assert [int(found.removed[labels == c].sum()) for c in (0, 1)] == [1, 2], name
    overall = remove_top_fraction(torch.arange(20.0), labels, 0.1 * 1.5, per_label=False)
    assert overall.nonzero().view(-1).tolist() == [17, 18, 19]
    # a half rounds up: 0.15 * 30 = 4.5 removes 5 (Python's round, half to even, would give 4)
    half = remove_top_fraction(torch.arange(30.0), torch.zeros(30).long(), 0.15, per_label=False)
    assert int(half.sum()) == 5


def test_ac_flags_the_smaller_cluster() -> None:
    features, labels, planted = planted_features(0.2)
    found = make_detector("ac").detect(features, labels)
    assert found.info["labels_flagged"] == [0]
    expected = torch.zeros(len(labels), dtype=torch.bool)
    expected[planted] = True
    assert torch.equal(found.removed, expected)
    first = found.info["clusters"][0]
    assert first["label"] == 0 and first["sizes"] == [40, 160] and first["flagged"]
    report = detection_report(found.scores, planted, found.removed)
    assert report["auroc"] > 0.95 and report["tpr"] == 1.0 and report["fpr"] == 0.0


def test_ac_when_the_planted_group_is_the_majority() -> None:
    # 70 % planted: the smaller cluster (share 0.3 < 0.35) is the CLEAN part, and it is what
    # gets removed (the docstring's failure case); the planted group is kept. PCA keeps the
    # synthetic clusters exact (FastICA on Gaussian noise dims does not converge).
    features, labels, planted = planted_features(0.7)
    found = make_detector("ac", reduce="pca").detect(features, labels)
    label0 = found.info["clusters"][0]
    assert label0["flagged"] and label0["sizes"] == [60, 140] and label0["smaller_share"] == 0.3
    assert not bool(found.removed[planted].any())
    assert int(found.removed[:200].sum()) == 60
    assert detection_report(found.scores, planted, found.removed)["tpr"] == 0.0
    # 55 % planted: the smaller (clean) share is 0.45 >= 0.35, so nothing is flagged there
    features, labels, planted = planted_features(0.55)
    found = make_detector("ac", reduce="pca").detect(features, labels)
    assert found.info["clusters"][0]["sizes"] == [90, 110]
    assert not found.info["clusters"][0]["flagged"]
    assert not bool(found.removed.any())


def test_ac_flags_only_a_share_strictly_below_the_threshold() -> None:
    # the smaller cluster of label 0 holds exactly 60 / 200 = 0.3 of it
    features, labels, planted = planted_features(0.3)
    at = make_detector("ac", reduce="pca", size_threshold=0.3).detect(features, labels)
    label0 = at.info["clusters"][0]
    assert label0["sizes"] == [60, 140] and label0["smaller_share"] == 0.3
    assert not label0["flagged"] and not bool(at.removed.any())
    above = make_detector("ac", reduce="pca", size_threshold=0.3 + 1e-9).detect(features, labels)
    assert above.info["labels_flagged"] == [0]
    assert above.removed.nonzero().view(-1).tolist() == planted.tolist()
    # samples of the flagged cluster score 1 - 0.3, which is above 1 - size_threshold
    assert torch.allclose(above.scores[planted], torch.tensor(0.7, dtype=torch.float64))
    # a label of 4 samples is clustered, one of 3 is not
    few = make_detector("ac", reduce="pca").detect(features[:7], (torch.arange(7) >= 4).long())
    assert [c["label"] for c in few.info["clusters"]] == [0]


def test_ac_survives_dead_units() -> None:
    # constant (dead ReLU) columns and rank < dims made FastICA's whitening return NaN
    features, labels, planted = planted_features(0.2, dim=4)
    features = torch.cat([features, torch.zeros(len(labels), 12)], dim=1)
    found = make_detector("ac", dims=10).detect(features, labels)
    assert bool(torch.isfinite(found.scores).all())
    assert bool(found.removed[planted].all())
    flat = make_detector("ac").detect(torch.ones(8, 3), torch.zeros(8, dtype=torch.long))
    assert not bool(flat.removed.any()) and flat.info["clusters"][0]["sizes"] == [0, 8]


def test_remove_top_fraction_overall_and_per_label() -> None:
    scores = torch.arange(10.0)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    overall = remove_top_fraction(scores, labels, 0.2, per_label=False)
    assert overall.nonzero().view(-1).tolist() == [8, 9]
    per_label = remove_top_fraction(scores, labels, 0.2, per_label=True)
    assert per_label.nonzero().view(-1).tolist() == [4, 9]


# ---------------------------------------------------------------------------------------------
# Detection metrics and table
# ---------------------------------------------------------------------------------------------


def test_detection_report_perfect_reversed_and_no_poison() -> None:
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 1.0])
    poison = torch.tensor([3, 4])
    removed = torch.tensor([False, False, True, True, False])
    report = detection_report(scores, poison, removed)
    assert report["auroc"] == 1.0
    assert report["tpr"] == 0.5 and report["fpr"] == pytest.approx(1 / 3)
    assert report["n_removed"] == 2 and report["n_removed_poison"] == 1
    assert detection_report(-scores, poison, removed)["auroc"] == 0.0
    empty = detection_report(scores, torch.empty(0, dtype=torch.long), removed)
    assert math.isnan(empty["auroc"]) and math.isnan(empty["tpr"]) and "no poison" in empty["note"]
    with pytest.raises(ValueError, match="removed_mask"):
        detection_report(scores, poison, torch.ones(3, dtype=torch.bool))
    mask = torch.tensor([False, False, False, True, True])  # the same poison, as a mask
    with pytest.raises(ValueError, match="integer indices; got torch.bool"):
        detection_report(scores, mask, removed)  # read as indices 0 and 1, it was wrong
    with pytest.raises(ValueError, match="integer indices; got torch.float32"):
        detection_report(scores, poison.float(), removed)


def test_detection_table_lays_out_rates_side_by_side() -> None:
    records = [
        {"detector": "ss", "poison_rate": 0.1, "auroc": 0.5, "tpr": 0.2, "fpr": 0.1},
        {"detector": "ss", "poison_rate": 0.01, "auroc": 0.9, "tpr": 0.8, "fpr": 0.1},
        {"detector": "ac", "poison_rate": 0.01, "auroc": 0.7, "tpr": 0.4, "fpr": 0.3},
        {"detector": "ac", "poison_rate": 0.01, "auroc": 0.9, "tpr": 0.6, "fpr": 0.1},
    ]
    rows = detection_table(records)
    assert [r["detector"] for r in rows] == ["ac", "ss"]
    assert list(rows[1]) == [
        "detector",
        "auroc@1%",
        "auroc@10%",
        "tpr@1%",
        "tpr@10%",
        "fpr@1%",
        "fpr@10%",
    ]
    assert rows[0]["auroc@1%"] == pytest.approx(0.8)  # two seeds averaged
    assert math.isnan(rows[0]["auroc@10%"]) and rows[1]["auroc@10%"] == 0.5


@pytest.mark.parametrize("model_name", ["cnn-small", "preact-resnet18", "mobilenetv2"])
def test_filters_score_what_the_classifier_reads(model_name: str) -> None:
    """SS, SPECTRE and AC score the penultimate representation, the final linear layer's
    input: after the head's own BN-ReLU (pre-activation ResNet) or 1x1 conv-BN-ReLU6
    (MobileNetV2), which the last stage's raw output (scored before) leaves out."""
    model = make_model(model_name, num_classes=10, in_channels=1).eval()
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    read: list[torch.Tensor] = []
    model.head[-1].register_forward_hook(lambda _m, inputs, _out: read.append(inputs[0]))
    with torch.no_grad():
        model(images.float() / 255)
    for name in ("ss", "spectre", "ac"):
        features = make_detector(name).features(model, images)
        assert features.shape == read[0].shape and torch.allclose(features, read[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A tiny model, data set and context for the end-to-end runs
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 3


def tiny_net() -> StagedNet:
    """A 3-stage conv net with BatchNorm (~1k parameters) on 1x12x12 images, the same
    weights on every call (seeded before the layers are built, whatever ran before)."""
    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    stages: OrderedDict[str, nn.Module] = OrderedDict(
        stem=block(1, 4, 1), layer1=block(4, 8, 2), layer2=block(8, 8, 2)
    )
    infos = [StageInfo("stem", 4, 1), StageInfo("layer1", 8, 2), StageInfo("layer2", 8, 4)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, NUM_CLASSES))
    return StagedNet(stages, head, infos, NUM_CLASSES, 1, default_guard_stage="layer1")


def test_tiny_net_is_the_same_whatever_ran_before() -> None:
    first = tiny_net().state_dict()
    torch.rand(100)  # another draw from the global RNG
    again = tiny_net().state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)


def tiny_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 12, 12) images whose class c has a bright band in rows 4c..4c+3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.randint(0, 60, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    rows = torch.arange(12)
    band = (rows[None, :] // 4) == labels[:, None]  # (n, 12)
    images[band[:, None, :, None].expand(n, 1, 12, 12)] = 200
    return images, labels


def tiny_context(with_clean: bool = True) -> DefenseContext:
    """96 training images with 10 % BadNets-like poison (corner patch -> label 0)."""
    images, labels = tiny_data(96, seed=1)
    poison_idx = torch.arange(1, 96, 10)
    images[poison_idx, :, -3:, -3:] = 255
    labels[poison_idx] = 0
    clean_images, clean_labels = tiny_data(24, seed=2)
    settings = TrainSettings(epochs=1, batch_size=16)

    def trainer(
        model: StagedNet, x: torch.Tensor, y: torch.Tensor, callbacks: Any = ()
    ) -> list[dict[str, Any]]:
        return train_model(
            model, x, y, settings, seed=0, device="cpu", callbacks=callbacks, progress=False
        )

    return DefenseContext(
        images=images,
        labels=labels,
        poison_idx=poison_idx,
        clean_images=clean_images if with_clean else None,
        clean_labels=clean_labels if with_clean else None,
        num_classes=NUM_CLASSES,
        model_factory=tiny_net,
        train=trainer,
        seed=0,
        device=torch.device("cpu"),
        progress=False,
    )


# Small settings per defence so every run takes well under a second.
SMOKE_PARAMS: dict[str, dict[str, Any]] = {
    "ft": {"epochs": 1, "batch_size": 8},
    "nad": {"teacher_epochs": 1, "epochs": 1, "batch_size": 8},
    "anp": {"iterations": 3, "batch_size": 8},
    "abl": {"isolation_epochs": 1, "unlearning_epochs": 1, "batch_size": 16},
    "spectre": {"dim": 4},
    "ac": {"dims": 4},
    "eigenguard": {"k": 2},
}


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defence_runs_end_to_end(name: str) -> None:
    if name == "eigenguard":
        pytest.importorskip("eglib.guard")
    ctx = tiny_context()
    asked: list[bool] = []
    ctx.undefended = lambda: asked.append(True)  # no cached run: the defence trains its own
    trained_on: list[int] = []
    train = ctx.train
    ctx.train = lambda model, images, labels, *a, **kw: (  # type: ignore[method-assign]
        trained_on.append(len(images)) or train(model, images, labels, *a, **kw)
    )
    defense = make_defense(name, **SMOKE_PARAMS.get(name, {}))
    outcome = defense.run(ctx)
    # a sweep orders runs by this flag: it must say whether the defence asks for the model
    assert bool(asked) is type(defense).starts_from_poisoned_model
    model = outcome.model
    assert isinstance(model, StagedNet)
    logits = model.eval()(torch.rand(2, 1, 12, 12))
    assert logits.shape == (2, NUM_CLASSES) and bool(torch.isfinite(logits).all())
    json.dumps(outcome.info)
    json.dumps(defense.params())
    fresh = defense.build_model(ctx)
    fresh.load_state_dict(model.state_dict())  # the architecture is unchanged
    assert ctx.history, "the run's training history is recorded"
    if name in detector_names():
        report = outcome.info["detection"]
        assert (
            report["n_poison"] == len(ctx.poison_idx)
            and report["n_removed"] == outcome.info["n_removed"]
        )
        assert 0.0 <= report["auroc"] <= 1.0
        # the defended model is retrained on the kept samples only, not on everything
        assert outcome.info["n_removed"] > 0
        assert trained_on[-1] == outcome.info["n_kept"] == len(ctx.labels) - report["n_removed"]


@pytest.mark.parametrize("isolation_augment", [False, True])
def test_abl_isolates_on_the_images_as_they_are(
    isolation_augment: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BackdoorBench and the ABL authors isolate without augmentation (a random crop moves a
    patch trigger and slows the very learning isolation reads); augmenting is an option."""
    import eglib.defenses.abl as abl

    asked: list[bool] = []
    tune = abl.tune

    def spy(*args: Any, **kwargs: Any) -> list[float]:
        asked.append(kwargs["augment_data"])
        return tune(*args, **kwargs)

    monkeypatch.setattr(abl, "tune", spy)
    defense = make_defense("abl", **SMOKE_PARAMS["abl"], isolation_augment=isolation_augment)
    ctx = tiny_context()
    defense.isolate(defense.build_model(ctx), ctx)
    assert asked == [isolation_augment]
    assert defense.params()["isolation_augment"] is isolation_augment


def test_clean_data_defences_need_the_reserve() -> None:
    for name in ("ft", "nad", "anp"):
        assert DEFENSES[name].needs_clean_data
        with pytest.raises(ValueError, match="clean data"):
            make_defense(name, **SMOKE_PARAMS[name]).run(tiny_context(with_clean=False))


def test_evaluate_detectors_shares_features_and_reports() -> None:
    ctx = tiny_context()
    model = tiny_net()
    ctx.train(model, ctx.images, ctx.labels)
    records = evaluate_detectors(
        model,
        ctx.images,
        ctx.labels,
        ctx.poison_idx,
        {"ss": {}, "ac": {"dims": 4}},
        extra={"poison_rate": 0.1},
    )
    assert [r["detector"] for r in records] == ["ss", "ac"]
    assert all(r["poison_rate"] == 0.1 and r["n_poison"] == 10 for r in records)
    assert "clusters" in records[1]["info"]  # AC's account of its decision travels along
    assert len(detection_table(records)) == 2


# ---------------------------------------------------------------------------------------------
# Pieces of the post-training defences
# ---------------------------------------------------------------------------------------------


def test_anp_hooks_are_identity_at_unit_masks_and_pruning_zeroes_channels() -> None:
    model = tiny_net().eval()
    x = torch.rand(4, 1, 12, 12)
    before = model(x)
    perturbation = NeuronPerturbation(model)
    assert set(perturbation.layers) == {"body.stem.1", "body.layer1.1", "body.layer2.1"}
    with perturbation.attached():
        torch.testing.assert_close(model(x), before)
    keys = list(model.state_dict())
    bn = perturbation.layers["body.layer1.1"]
    kept_weight = bn.weight.detach().clone()
    with torch.no_grad():
        perturbation.masks["body.layer1.1"][[0, 5]] = 0.1
        perturbation.masks["body.stem.1"][1] = 0.25
    order = pruning_order(perturbation, threshold=0.2)
    assert order == [("body.layer1.1", 0), ("body.layer1.1", 5)]
    pruned = prune_channels(perturbation, order)
    assert pruned == {"body.stem.1": 0, "body.layer1.1": 2, "body.layer2.1": 0}
    assert bn.weight[[0, 5]].abs().sum() == 0 and bn.bias[[0, 5]].abs().sum() == 0
    torch.testing.assert_close(bn.weight[1:5], kept_weight[1:5])
    assert list(model.state_dict()) == keys
    tiny_net().load_state_dict(model.state_dict())
    with torch.no_grad():
        assert model.stage("layer1")(model.stage("stem")(x))[:, [0, 5]].abs().sum() == 0


def test_anp_max_acc_drop_limits_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_net().eval()
    perturbation = NeuronPerturbation(model)
    with torch.no_grad():
        perturbation.masks["body.layer1.1"][:6] = torch.linspace(0.0, 0.1, 6)

    def fake_accuracy(net: nn.Module, *args: Any, **kwargs: Any) -> float:
        # each pruned channel costs 0.1 accuracy
        zeroed = sum(int((bn.weight == 0).sum()) for bn in perturbation.layers.values())
        return 1.0 - 0.1 * zeroed

    monkeypatch.setattr("eglib.defenses.anp.accuracy", fake_accuracy)
    x = torch.zeros(6, 1, 12, 12, dtype=torch.uint8)
    y = torch.zeros(6, dtype=torch.long)
    cpu = torch.device("cpu")
    free, before = AdversarialNeuronPruning().choose_neurons(model, perturbation, x, y, cpu)
    assert before == 1.0 and len(free) == 6
    bounded, _ = AdversarialNeuronPruning(max_acc_drop=0.25).choose_neurons(
        model, perturbation, x, y, cpu
    )
    assert bounded == [("body.layer1.1", 0), ("body.layer1.1", 1)]  # the two smallest masks
    assert fake_accuracy(model) == 1.0  # the search restored the weights


def test_anp_mask_scales_the_batchnorm_weight() -> None:
    model = tiny_net().eval()
    x = torch.rand(4, 1, 12, 12)
    perturbation = NeuronPerturbation(model)
    with torch.no_grad():
        perturbation.masks["body.stem.1"].fill_(0.5)
    with perturbation.attached(), torch.no_grad():
        masked = model.stage("stem")(x)
    with torch.no_grad():
        perturbation.layers["body.stem.1"].weight.mul_(0.5)
        scaled = model.stage("stem")(x)
    torch.testing.assert_close(masked, scaled)


def test_nad_attention_loss_and_stage_outputs() -> None:
    a = torch.randn(2, 8, 3, 3)
    assert attention_loss(a, a.clone(), 2.0) == 0
    assert attention_loss(a, torch.randn(2, 8, 3, 3), 2.0) > 0
    assert attention_loss(a, 3 * a, 2.0) < 1e-12  # maps are normalised
    model = tiny_net()
    with stage_outputs(model, ["layer1", "layer2"]) as out:
        model(torch.rand(2, 1, 12, 12))
    assert out["layer1"].shape == (2, 8, 6, 6) and out["layer1"].requires_grad
    assert not model.stage("layer1")._forward_hooks  # removed on exit


def test_lga_loss_ascends_below_gamma() -> None:
    model = tiny_net()
    x, y = torch.rand(4, 1, 12, 12), torch.zeros(4, dtype=torch.long)
    ce = nn.functional.cross_entropy(model(x), y)
    assert lga_loss(gamma=ce.item() + 1)(model, x, y).item() == pytest.approx(-ce.item())
    assert lga_loss(gamma=0.0)(model, x, y).item() == pytest.approx(ce.item())


# ---------------------------------------------------------------------------------------------
# Behaviour of the post-training defences (tiny, each well under a second)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _poisoned_state() -> dict[str, torch.Tensor]:
    """tiny_net trained on tiny_context's poisoned data (once per session)."""
    ctx = tiny_context()
    model = tiny_net()
    ctx.train(model, ctx.images, ctx.labels)
    return {k: v.clone() for k, v in model.state_dict().items()}


def cached_context(seed: int = 0) -> DefenseContext:
    """tiny_context with run seed `seed` whose undefended run is cached: the post-training
    defences start from the same poisoned model without training it again."""
    ctx = tiny_context()
    ctx.seed = seed
    state = _poisoned_state()
    ctx.undefended = lambda: ({k: v.clone() for k, v in state.items()}, [], "cached")
    return ctx


def _poisoned_net() -> StagedNet:
    model = tiny_net()
    model.load_state_dict(_poisoned_state())
    return model.eval()


def test_anp_draws_follow_its_own_seed_not_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """As SPECTRE's and AC's, ANP's own randomness (batch order, perturbation starts) comes
    from its `seed` parameter, the same in every run (README: a table's spread over seeds
    measures the trained models); another `seed` draws others."""
    masks: list[torch.Tensor] = []
    learn = AdversarialNeuronPruning.learn_masks

    def spy(self: AdversarialNeuronPruning, *args: Any, **kwargs: Any) -> NeuronPerturbation:
        perturbation = learn(self, *args, **kwargs)
        masks.append(torch.cat([m.detach().clone() for m in perturbation.masks.values()]))
        return perturbation

    monkeypatch.setattr(AdversarialNeuronPruning, "learn_masks", spy)
    assert AdversarialNeuronPruning().params()["seed"] == 0
    for seed, run_seed in ((0, 0), (0, 1), (1, 0)):
        make_defense("anp", **SMOKE_PARAMS["anp"], seed=seed).run(cached_context(run_seed))
    seed_0_run_0, seed_0_run_1, seed_1_run_0 = masks
    assert torch.equal(seed_0_run_0, seed_0_run_1)  # the run's seed does not move the draws
    assert not torch.equal(seed_0_run_0, seed_1_run_0)  # the defence's seed does


def test_anp_noise_step_raises_the_loss() -> None:
    """The perturbation step is gradient ASCENT: after it the loss under the perturbation is
    above both the loss at its random start and the loss without perturbation."""
    model = _poisoned_net().requires_grad_(False)
    images, labels = tiny_data(24, seed=2)
    x = to_float(images)
    anp = AdversarialNeuronPruning(eps=0.4, steps=1)
    perturbation = NeuronPerturbation(model)
    masks_stay = torch.optim.SGD(list(perturbation.masks.values()), lr=0.0)
    noise_opt = torch.optim.SGD(perturbation.noise_tensors(), lr=anp.eps / anp.steps)

    def loss(noisy: bool) -> float:
        perturbation.noisy = noisy
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), labels))

    with perturbation.attached():
        anp._step(model, perturbation, masks_stay, noise_opt, x, labels, _seeded(0))
        natural, perturbed = loss(False), loss(True)
        draws = _seeded(0)  # the random start the step began from, drawn again
        with torch.no_grad():
            for tensor in perturbation.noise_tensors():
                tensor.copy_((2 * torch.rand(tensor.shape, generator=draws) - 1) * anp.eps)
        start = loss(True)
    assert perturbed > start and perturbed > natural


def test_anp_mask_learning_moves_the_masks_not_the_weights() -> None:
    model = _poisoned_net()
    images, labels = tiny_data(24, seed=2)
    anp = AdversarialNeuronPruning(iterations=3, batch_size=8)
    cpu = torch.device("cpu")
    perturbation = anp.learn_masks(model, images, labels, cpu, False)
    masks = torch.cat([m.detach() for m in perturbation.masks.values()])
    assert int((masks < 1).sum()) >= 3 and bool(((masks >= 0) & (masks <= 1)).all())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, _poisoned_state()[name], msg=name)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("betas", [(0.0, 0.0, 0.0), (500.0, 1000.0, 1000.0)])
def test_nad_loss_is_cross_entropy_plus_weighted_attention_distance(
    betas: tuple[float, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The student's loss is CE + sum_i betas[i] * AT(student, teacher) at each layer, the
    attention maps of the student against those of the fine-tuned teacher: with all betas 0
    exactly CE. (Checked in eval mode, where the forward passes are deterministic.)"""
    import eglib.defenses.nad as nad

    layers = ["stem", "layer1", "layer2"]  # the last len(betas) stages of tiny_net
    seen: dict[str, Any] = {}
    fine_tune, tune = nad.fine_tune, nad.tune

    def teacher_spy(ctx: DefenseContext, teacher: StagedNet, *args: Any) -> list[float]:
        seen["teacher"] = teacher
        return fine_tune(ctx, teacher, *args)

    def distances(student: StagedNet, x: torch.Tensor) -> list[float]:
        with (
            torch.no_grad(),
            stage_outputs(student, layers) as s_out,
            stage_outputs(seen["teacher"], layers) as t_out,
        ):
            student(x), seen["teacher"](x)
            return [float(attention_loss(s_out[n], t_out[n], 2.0)) for n in layers]

    def student_spy(
        model: StagedNet, images: torch.Tensor, labels: torch.Tensor, loss_fn: Any, **kw: Any
    ) -> list[float]:
        x, y = to_float(images), labels
        model.eval()
        with torch.no_grad():
            got = float(loss_fn(model, x, y))
            ce = float(nn.functional.cross_entropy(model(x), y))
        seen["distances"] = distances(model, x)
        seen["loss"] = (got, ce)
        return tune(model, images, labels, loss_fn, **kw)

    monkeypatch.setattr(nad, "fine_tune", teacher_spy)
    monkeypatch.setattr(nad, "tune", student_spy)
    params = {**SMOKE_PARAMS["nad"], "betas": betas}
    make_defense("nad", **params).run(cached_context())
    got, ce = seen["loss"]
    want = sum(b * d for b, d in zip(betas, seen["distances"], strict=True))
    assert got - ce == pytest.approx(want, rel=1e-4, abs=1e-6)
    if any(betas):
        assert want > 1e-3  # the teacher differs from the student: the term is not trivial


@pytest.mark.parametrize("name", ["ft", "nad"])
def test_ft_and_nad_tune_on_the_clean_reserve(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FT's fine-tuning and NAD's teacher and student see the clean reserve only, never the
    poisoned training set."""
    import eglib.defenses.ft as ft
    import eglib.defenses.nad as nad

    rows: list[tuple[str, int]] = []
    train, tune = ft.train_model, nad.tune

    def train_spy(model: StagedNet, images: torch.Tensor, *args: Any, **kw: Any) -> Any:
        rows.append(("fine-tune", len(images)))
        return train(model, images, *args, **kw)

    def tune_spy(model: StagedNet, images: torch.Tensor, *args: Any, **kw: Any) -> Any:
        rows.append(("distil", len(images)))
        return tune(model, images, *args, **kw)

    monkeypatch.setattr(ft, "train_model", train_spy)
    monkeypatch.setattr(nad, "tune", tune_spy)
    ctx = cached_context()
    assert ctx.clean_labels is not None
    n_clean = len(ctx.clean_labels)
    assert n_clean != len(ctx.labels)
    make_defense(name, **SMOKE_PARAMS[name]).run(ctx)
    want = [("fine-tune", n_clean)] + ([("distil", n_clean)] if name == "nad" else [])
    assert rows == want


# ---------------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("ss", {"rate_guess": 0.0}, "rate_guess"),
        ("ss", {"rate_guess": 0.7}, "rate_guess \\* removal_factor"),
        ("ss", {"pool": "max"}, "pool"),
        ("spectre", {"dim": 0}, "dim"),
        ("spectre", {"alpha": -1.0}, "alpha"),
        ("ac", {"reduce": "tsne"}, "allowed: \\['ica', 'pca'\\]"),
        ("ac", {"size_threshold": 1.5}, "size_threshold"),
        ("eigenguard-score", {"per_label": 1}, "per_label"),
        ("eigenguard-score", {"k": 0}, "k=0"),
        ("ft", {"epochs": 0}, "epochs"),
        ("ft", {"lr": -0.1}, "lr"),
        ("nad", {"betas": (1.0, 2.0), "layers": ["layer1"]}, "one beta per layer"),
        ("nad", {"betas": ()}, "betas"),
        ("anp", {"threshold": 1.5}, "threshold"),
        ("anp", {"eps": -0.1}, "eps"),
        ("abl", {"isolation_ratio": 0.0}, "isolation_ratio"),
        ("abl", {"batch_size": 1}, "batch_size"),
    ],
)
def test_bad_parameters_are_refused(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_defense(name, **params)


def test_unknown_names_list_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed: .*'ss'"):
        make_defense("nope")
    with pytest.raises(ValueError, match="unknown detector 'ft'; allowed"):
        make_detector("ft")
    model = tiny_net()
    with pytest.raises(KeyError, match="unknown feature 'layer9'; valid: .*'penultimate'"):
        make_detector("ss", layer="layer9").features(
            model, torch.zeros(2, 1, 12, 12, dtype=torch.uint8)
        )
    with pytest.raises(KeyError, match="valid stages"):
        make_defense("nad", betas=(1.0,), layers=["layer9"]).run(tiny_context())
