"""The shared parameter checks: each names the value and the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eglib.params import check_chosen, check_int, check_seeds
from eglib.studies import STUDIES


def test_check_int_bounds_bools_and_numpy() -> None:
    assert check_int("n", 3, 1) == 3 and check_int("n", 5, 1, 5) == 5
    assert type(check_int("n", np.int64(4), 1, numpy=True)) is int
    for value, numpy, match in [
        (0, False, r"n=0; must be an int >= 1$"),
        (2.0, False, r"n=2\.0; must be an int >= 1$"),
        ("2", False, r"n='2'; must be an int >= 1$"),
        (True, False, r"n=True; must be an int \(not a bool\) >= 1$"),
        (np.bool_(True), True, r"must be an int \(not a bool\) >= 1$"),
        (np.int64(4), False, r"n=np.int64\(4\); must be an int >= 1$"),  # NumPy only when asked
    ]:
        with pytest.raises(ValueError, match=match):
            check_int("n", value, 1, numpy=numpy)
    with pytest.raises(ValueError, match=r"n=6; must be an int in \[1, 5\]$"):
        check_int("n", 6, 1, 5)
    with pytest.raises(ValueError, match=r"n=np.int64\(0\); must be an int in \[1, 5\]$"):
        check_int("n", np.int64(0), 1, 5, numpy=True)


def test_check_seeds_default_and_refusals() -> None:
    assert check_seeds(None, (0, 1, 2)) == (0, 1, 2)
    assert check_seeds([2, 0], (0,)) == (2, 0)  # the order asked for
    for seeds, match in [
        ([], r"seeds=\[\]; give at least one$"),
        ([0, 1, 0, 1], r"seeds=\[0, 1, 0, 1\] repeat \[0, 1\]; give each once$"),
        ([0, -1], r"seeds\[1\]=-1; must be an int >= 0"),
        ([True], r"seeds\[0\]=True; must be an int \(not a bool\) >= 0"),
        (["0"], r"seeds\[0\]='0'; must be an int >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_seeds(seeds, (0,))


def test_check_chosen_names_the_repeated_values() -> None:
    assert check_chosen("attacks", None, ("badnets",)) == ("badnets",)
    assert check_chosen("attacks", ["sig", "lf"], ()) == ("sig", "lf")
    with pytest.raises(ValueError, match=r"attacks=\['lf', 'sig', 'lf', 'lf'\] repeat \['lf'\]"):
        check_chosen("attacks", ["lf", "sig", "lf", "lf"], ())
    with pytest.raises(ValueError, match=r"defenses=\[\]; give at least one$"):
        check_chosen("defenses", [], ("none",))


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_refuses_a_repeated_seed_before_training(name: str, tmp_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"seeds=\[0, 0\] repeat \[0\]"):
        STUDIES[name].run("ci", progress=False, seeds=[0, 0])  # type: ignore[call-arg]
