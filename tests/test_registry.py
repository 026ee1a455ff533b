"""The shared registry operations behind models, attacks and defences."""

from __future__ import annotations

import pytest

from eglib.defenses import make_defense
from eglib.models import make_model
from eglib.poison import make_attack
from eglib.registry import add_entry, lookup


def test_add_and_lookup() -> None:
    table: dict[str, int] = {}
    assert add_entry(table, "thing", "a", 1) == 1 and lookup(table, "thing", "a") == 1
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        add_entry(table, "thing", "a", 2)
    with pytest.raises(ValueError, match=r"unknown thing 'b'; allowed: \['a'\]"):
        lookup(table, "thing", "b")


@pytest.mark.parametrize(
    "make, kind", [(make_model, "model"), (make_attack, "attack"), (make_defense, "defence")]
)
def test_every_registry_names_unknown_entries(make, kind) -> None:
    with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; allowed: "):
        make("nope") if kind != "model" else make("nope", 10, 1)
