"""Backdoor defences behind one interface (`make_defense(name, **params).run(ctx)`)."""

from eglib.defenses import (  # noqa: F401  (importing a defence's module registers it)
    abl,
    activation_clustering,
    anp,
    eigenguard_score,
    ft,
    nad,
    spectral_signatures,
    spectre,
    standard,
)
from eglib.defenses.base import (
    DEFENSES,
    Defense,
    DefenseContext,
    DefenseOutcome,
    make_defense,
    recorded_params,
    register_defense,
    train_on,
)

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseContext",
    "DefenseOutcome",
    "make_defense",
    "recorded_params",
    "register_defense",
    "train_on",
]
