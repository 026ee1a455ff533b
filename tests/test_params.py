"""The shared parameter checks: each names the value and the rule."""

from __future__ import annotations

import numpy as np
import pytest

from eglib.params import check_int


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
