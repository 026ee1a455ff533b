"""EigenGuard: equals the SVD route, finite gradients, running statistics, placement helpers."""

from __future__ import annotations

import io

import pytest
import torch

from eglib.guard import (
    RULES,
    EigenGuard,
    _top_factors,
    guards,
    insert_guard,
    is_identity_filter,
    remove_guard,
    set_eval_mode,
    svd_filter,
)
from eglib.models import make_model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank(rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) float64 matrix of exact rank `rank`, spread singular values."""
    g = _gen(seed)
    left = torch.randn(rows, rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, cols, generator=g, dtype=torch.float64)
    return left @ torch.diag(torch.linspace(3.0, 1.0, rank, dtype=torch.float64)) @ right


def _deficient(seed: int = 0) -> torch.Tensor:
    """12 rows of dimension 40: 5 random, their duplicates, and 2 zero rows (rank 5)."""
    base = torch.randn(5, 40, generator=_gen(seed), dtype=torch.float64)
    return torch.cat([base, base, torch.zeros(2, 40, dtype=torch.float64)])


BATCHES = {
    "random-wide": (lambda: torch.randn(16, 40, generator=_gen(1), dtype=torch.float64), 4),
    "random-tall": (lambda: torch.randn(24, 6, generator=_gen(2), dtype=torch.float64), 3),
    "random-4d": (lambda: torch.randn(10, 2, 3, 4, generator=_gen(3), dtype=torch.float64), 3),
    "low-rank-above-k": (lambda: _low_rank(16, 40, 6), 3),
    "low-rank-below-k": (lambda: _low_rank(16, 40, 3), 5),
    "deficient-above-k": (_deficient, 3),
    "deficient-below-k": (_deficient, 8),
}


@pytest.mark.parametrize("tail_scale", [1.0, 0.001])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_gram_route_equals_svd_route(batch: str, rule: str, tail_scale: float) -> None:
    make, k = BATCHES[batch]
    x = make()
    expected = svd_filter(x, k, rule=rule, top_scale=0.001, tail_scale=tail_scale)
    guard = EigenGuard(k, rule=rule, top_scale=0.001, tail_scale=tail_scale).train()
    scale = float(x.abs().max())
    torch.testing.assert_close(guard(x), expected, rtol=0, atol=1e-9 * scale)
    # float32 features (what models produce): same answer to float32 precision
    got32 = guard(x.float()).double()
    torch.testing.assert_close(got32, expected, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("rule", RULES)
def test_ill_conditioned_float32_batch_matches_svd_route(rule: str) -> None:
    g = _gen(13)
    left = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(300, 16, generator=g, dtype=torch.float64))[0]
    x = ((left * torch.logspace(0, -5, 16, dtype=torch.float64)) @ right.T).float()
    expected = svd_filter(x.double(), 12, rule=rule, top_scale=0.01, tail_scale=0.001)
    got = EigenGuard(12, rule=rule, top_scale=0.01, tail_scale=0.001)(x).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(x.abs().max()))


def test_rules_give_the_documented_spectrum() -> None:
    x = _low_rank(12, 30, 8)
    s = torch.linalg.svdvals(x)
    for rule, top in [
        ("kth", s[2].repeat(3)),
        ("mean", s[:3].mean().repeat(3)),
        ("damp", 0.01 * s[:3]),
        ("remove", torch.zeros(3, dtype=torch.float64)),
    ]:
        out = EigenGuard(3, rule=rule, top_scale=0.01, tail_scale=0.5)(x)
        want = torch.cat([top, 0.5 * s[3:]]).sort(descending=True).values
        torch.testing.assert_close(torch.linalg.svdvals(out), want, rtol=1e-9, atol=1e-9)


DEGENERATE = {
    "duplicated-rows": lambda: torch.randn(4, 8, 3, 3, generator=_gen(4)).repeat(4, 1, 1, 1),
    "zero-rows": lambda: torch.cat(
        [torch.randn(10, 8, 3, 3, generator=_gen(5)), torch.zeros(6, 8, 3, 3)]
    ),
    "identical-images": lambda: torch.randn(1, 8, 3, 3, generator=_gen(6)).expand(16, -1, -1, -1),
    "all-zero": lambda: torch.zeros(16, 8, 3, 3),
}


@pytest.mark.parametrize("tail_scale", [1.0, 0.001])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_forward_and_backward_finite_on_degenerate_batches(
    case: str, rule: str, tail_scale: float
) -> None:
    x = DEGENERATE[case]().clone().requires_grad_(True)
    guard = EigenGuard(4, rule=rule, top_scale=0.001, tail_scale=tail_scale).train()
    out = guard(x)
    weights = torch.randn(out.shape, generator=_gen(7))
    (out * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(guard.running_basis).all() and torch.isfinite(guard.running_scale).all()
    zero_rows = x.detach().flatten(1).abs().sum(1) == 0
    assert (out.detach().flatten(1)[zero_rows] == 0).all()  # zero rows stay zero
    if case == "all-zero":
        assert x.grad.abs().sum() > 0  # gradient still flows (tail_scale * weights)


def test_gradient_is_that_of_the_fixed_linear_map() -> None:
    x = torch.randn(12, 30, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(12, 30, generator=_gen(9), dtype=torch.float64)
    guard = EigenGuard(4, rule="kth", tail_scale=0.1)
    (guard(x) * weights).sum().backward()
    U, s, _ = torch.linalg.svd(x.detach(), full_matrices=False)
    factors = torch.full_like(s, 0.1)
    factors[:4] = s[3] / s[:4]
    M = U @ torch.diag(factors) @ U.T  # out = M A with M held constant
    assert x.grad is not None
    torch.testing.assert_close(x.grad, M.T @ weights, rtol=1e-9, atol=1e-9)


def test_training_a_guarded_model_stays_finite_on_identical_images() -> None:
    torch.manual_seed(0)
    model = make_model("cnn-small", 3, 1)
    guard = insert_guard(model, k=4, rule="mean")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.rand(1, 1, 8, 8).expand(8, -1, -1, -1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(guard.num_batches_tracked) == 3


def _trained_guard() -> tuple[EigenGuard, torch.Tensor]:
    """EigenGuard(3, 'kth', tail 0.5) after three training batches of (16, 4, 3, 3) features
    with a decaying spectrum; returns it (in eval mode) and a test batch (9, 4, 3, 3)."""
    g = _gen(0)
    mix = torch.randn(36, 36, generator=g)
    guard = EigenGuard(3, rule="kth", tail_scale=0.5).train()
    for _ in range(3):
        batch = torch.randn(16, 36, generator=g).mul(torch.linspace(4, 0.5, 36)) @ mix
        guard(batch.reshape(16, 4, 3, 3))
    test = (torch.randn(9, 36, generator=g) @ mix).reshape(9, 4, 3, 3)
    return guard.eval(), test


def test_running_mode_is_per_sample_and_handles_a_batch_of_one() -> None:
    guard, x = _trained_guard()
    full = guard(x)
    for i in range(len(x)):
        torch.testing.assert_close(guard(x[i : i + 1]), full[i : i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, x)  # it does filter


def test_state_dict_round_trip_gives_identical_eval_outputs() -> None:
    guard, x = _trained_guard()
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    fresh = EigenGuard(3, rule="kth", tail_scale=0.5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert set(guard.state_dict()) == {"running_basis", "running_scale", "num_batches_tracked"}
    assert torch.equal(fresh(x), guard(x))
    for mode in ("batch", "running"):
        fresh.eval_mode = guard.eval_mode = mode
        assert torch.equal(fresh(x), guard(x))


def test_state_dict_with_another_k_is_refused() -> None:
    guard, _ = _trained_guard()
    with pytest.raises(RuntimeError, match=r"expects \(D, 5\)"):
        EigenGuard(5).load_state_dict(guard.state_dict())


def test_running_stats_match_a_repeated_batch() -> None:
    x = torch.randn(16, 36, generator=_gen(10), dtype=torch.float64)
    guard = EigenGuard(4, rule="kth", tail_scale=0.5).double().train()
    for _ in range(3):
        trained = guard(x)
    s = torch.linalg.svdvals(x)
    torch.testing.assert_close(guard.running_scale, s[:4] / 4.0)  # s / sqrt(B)
    basis = guard.running_basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=torch.float64))
    guard.eval()
    torch.testing.assert_close(guard(x), trained)  # the running filter reproduces the batch's


def test_running_scale_does_not_depend_on_batch_size() -> None:
    x = torch.randn(8, 20, generator=_gen(11), dtype=torch.float64)
    small = EigenGuard(3).double().train()
    large = EigenGuard(3).double().train()
    small(x)
    large(torch.cat([x, x, x]))
    torch.testing.assert_close(small.running_scale, large.running_scale)


def test_running_second_moment_is_an_ema() -> None:
    g = _gen(12)
    x1, x2 = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    guard = EigenGuard(4, momentum=0.3).double().train()  # k = D: no truncation, exact EMA
    guard(x1)
    guard(x2)
    basis, scale = guard.running_basis, guard.running_scale
    expected = 0.7 * x1.T @ x1 / 8 + 0.3 * x2.T @ x2 / 8
    torch.testing.assert_close(basis @ torch.diag(scale**2) @ basis.T, expected)


def test_batch_mode_equals_training_filter_and_refuses_a_batch_of_one() -> None:
    guard, x = _trained_guard()
    before = {n: v.clone() for n, v in guard.state_dict().items()}  # a state_dict aliases
    guard.eval_mode = "batch"
    want = svd_filter(x, k=3, rule="kth", tail_scale=0.5)
    torch.testing.assert_close(guard(x), want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, guard.state_dict()[n]) for n, v in before.items())  # no update
    with pytest.raises(ValueError, match=r"B=1"):
        guard(x[:1])


def test_running_mode_before_training_raises() -> None:
    with pytest.raises(RuntimeError, match="no running statistics"):
        EigenGuard(2).eval()(torch.randn(4, 10))


def test_eval_mode_is_validated() -> None:
    guard = EigenGuard(2)
    guard.eval_mode = "batch"
    assert guard.eval_mode == "batch"
    with pytest.raises(ValueError, match=r"unknown eval_mode 'bogus'; allowed"):
        guard.eval_mode = "bogus"
    with pytest.raises(ValueError, match="'bogus'"):
        EigenGuard(2, eval_mode="bogus")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"k": 0}, "k=0"),
        ({"k": 2.5}, "k=2.5"),
        ({"k": 2, "rule": "foo"}, r"unknown rule 'foo'; allowed: \['kth'"),
        ({"k": 2, "top_scale": 0.0}, "top_scale=0.0"),
        ({"k": 2, "top_scale": 1.5}, "top_scale=1.5"),
        ({"k": 2, "tail_scale": 0.0}, "tail_scale=0.0"),
        ({"k": 2, "tail_scale": float("nan")}, "tail_scale=nan"),
        ({"k": 2, "momentum": 0.0}, "momentum=0.0"),
        ({"k": 2, "eps": 2.0}, "eps=2.0"),
        # wrong types: a clear ValueError, not a bare TypeError from a comparison
        ({"k": 4, "top_scale": "0.1"}, r"top_scale='0.1'; must be a finite number"),
        ({"k": 4, "momentum": None}, r"momentum=None; must be a finite number in \(0.0, 1.0\]"),
        ({"k": 4, "eps": "1e-6"}, r"eps='1e-6'; must be a finite number in \(0.0, 1.0\)"),
        ({"k": 4, "tail_scale": True}, "tail_scale=True"),  # not read as 1.0
        ({"k": 4, "rule": "damp", "top_scale": True}, "top_scale=True"),
        ({"k": True}, "k=True"),
        ({"k": 4, "top_scale": float("inf")}, "top_scale=inf"),
        ({"k": 4, "momentum": float("nan")}, "momentum=nan"),
        ({"k": 4, "eps": [1e-6]}, r"eps=\[1e-06\]"),
    ],
)
def test_bad_parameters_raise(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EigenGuard(**params)


IDENTITIES = [
    {"k": 1, "rule": "kth"},
    {"k": 1, "rule": "mean", "tail_scale": 1.0},
    {"k": 1, "rule": "damp", "top_scale": 1.0},
    {"k": 5, "rule": "damp", "top_scale": 1.0, "tail_scale": 1.0},
]


@pytest.mark.parametrize("params", IDENTITIES)
def test_identity_guards_are_refused(params: dict) -> None:
    """Settings under which the guard maps every batch to itself: refused, naming a fix."""
    assert is_identity_filter(**params)
    with pytest.raises(ValueError, match=r"is the identity: it would change nothing.*use "):
        EigenGuard(**params)
    with pytest.raises(ValueError, match="is the identity"):
        svd_filter(torch.randn(8, 6), **params)


def test_identity_settings_are_exactly_those_whose_factors_are_all_one() -> None:
    """On a spectrum of distinct singular values, g(s)/s = 1 everywhere (top k and tail)
    holds for exactly the settings `is_identity_filter` names, and no others: e.g. k=1 with
    a tail < 1, 'damp' with top_scale = tail_scale < 1 (a uniform rescaling) or 'remove' at
    k=1 are real filters and are accepted."""
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    seen = set()
    for k in (1, 2, 3):
        for rule in RULES:
            for top_scale in (0.5, 1.0):
                for tail_scale in (0.5, 1.0):
                    top = _top_factors(s, k, rule, top_scale, tail_scale, 1e-6)
                    unchanged = bool((top == 1).all()) and tail_scale == 1.0
                    assert is_identity_filter(k, rule, top_scale, tail_scale) is unchanged
                    seen.add(unchanged)
                    if not unchanged:
                        x = torch.randn(8, 6, dtype=torch.float64, generator=_gen(k))
                        out = EigenGuard(k, rule, top_scale, tail_scale).double().train()(x)
                        assert not torch.allclose(out, x)
    assert seen == {True, False}


def test_bad_batches_raise() -> None:
    guard = EigenGuard(5).train()
    assert guard.min_batch == 6
    with pytest.raises(ValueError, match=r"B=3.*k"):
        guard(torch.randn(3, 20))
    with pytest.raises(ValueError, match=r"D=4 < k"):
        guard(torch.randn(8, 4))
    bad = torch.randn(8, 20)
    bad[2, 3] = float("nan")
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match="1 NaN and 1 inf"):
        guard(bad)
    guard(torch.randn(8, 20))
    guard.eval()
    with pytest.raises(ValueError, match="NaN"):
        guard(bad)
    with pytest.raises(ValueError, match="D=30"):
        guard(torch.randn(8, 30))


def test_insert_remove_and_set_eval_mode() -> None:
    model = make_model("cnn-small", 3, 1).eval()
    guard = insert_guard(model, k=2, rule="damp", top_scale=0.01)
    assert model.guards["layer1"] is guard and model.stage_output_module("layer1") is guard
    assert not guard.training and guard.rule == "damp"
    second = insert_guard(model, at="layer2", k=3, eval_mode="batch")
    assert list(guards(model)) == ["layer1", "layer2"]
    set_eval_mode(model, "batch")
    assert guard.eval_mode == second.eval_mode == "batch"
    with pytest.raises(ValueError, match="'sideways'"):
        set_eval_mode(model, "sideways")
    with pytest.raises(KeyError, match=r"unknown stage 'layer9'.*'stem'"):
        insert_guard(model, at="layer9", k=2)
    assert remove_guard(model, "layer2") is second
    assert list(guards(model)) == ["layer1"]
    with pytest.raises(KeyError, match=r"no guard after stage 'layer2'.*\['layer1'\]"):
        remove_guard(model, "layer2")
    model.train()
    logits = model(torch.rand(6, 1, 8, 8))
    logits.sum().backward()
    assert logits.shape == (6, 3) and int(guard.num_batches_tracked) == 1


def test_insert_guard_falls_back_to_the_second_stage() -> None:
    model = make_model("cnn-small", 3, 1)
    del model.default_guard_stage
    insert_guard(model, k=2)
    assert list(guards(model)) == [model.stages[1]]
