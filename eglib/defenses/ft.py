"""Fine-tuning (FT) on a small clean reserve: the simplest post-training backdoor repair."""

from __future__ import annotations

from eglib.defenses.base import Defense, DefenseContext, DefenseOutcome, register_defense
from eglib.defenses.loops import clean_reserve, poisoned_model
from eglib.models.base import StagedNet
from eglib.params import check_bool, check_float, check_int
from eglib.train import TrainSettings, train_model


def fine_tune(
    ctx: DefenseContext,
    model: StagedNet,
    settings: TrainSettings,
    defense: str,
) -> list[float]:
    """Fine-tune `model` in place on the context's clean reserve; the loss of each epoch."""
    images, labels = clean_reserve(ctx, defense)
    history = train_model(
        model, images, labels, settings, seed=ctx.seed, device=ctx.device, progress=ctx.progress
    )
    return [float(row["loss"]) for row in history]


@register_defense
class FineTuning(Defense):
    """FT: train on the poisoned data, then fine-tune on the clean reserve with a small lr.

    Used as a baseline by Liu et al. ("Fine-Pruning", RAID 2018) and in BackdoorBench (Wu et
    al., NeurIPS 2022 Datasets & Benchmarks). The fine-tuning uses the project's training
    loop (SGD nesterov, cosine decay from `lr`, crop augmentation) on `ctx.clean_images`.

    Parameters (defaults): epochs=20, lr=0.01, batch_size=64, hflip=False (crop
    augmentation only, as the project's defence table runs it; hflip=True adds random
    horizontal flips, an option for data whose classes survive a flip). BackdoorBench's
    CIFAR-10 config: 100 epochs, batch 256, lr 0.01, cosine, 5 % clean data; our clean
    reserve is smaller and the budget is CPU, so fewer epochs with smaller batches (a
    similar number of steps on the `ci` profile's reserve is out of reach; raise `epochs`
    on a GPU).
    """

    name = "ft"
    stage = "post"
    needs_clean_data = True
    starts_from_poisoned_model = True

    def __init__(
        self, epochs: int = 20, lr: float = 0.01, batch_size: int = 64, hflip: bool = False
    ) -> None:
        self.epochs = check_int("epochs", epochs, 1)
        self.lr = check_float("lr", lr, low=0.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 2)
        self.hflip = check_bool("hflip", hflip)

    def settings(self) -> TrainSettings:
        """The fine-tuning recipe as `TrainSettings`."""
        return TrainSettings(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, hflip=self.hflip
        )

    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Train on everything, then fine-tune on the clean reserve."""
        _, clean_labels = clean_reserve(ctx, self.name)  # fail before the long training
        model = poisoned_model(self, ctx)
        losses = fine_tune(ctx, model, self.settings(), self.name)
        return DefenseOutcome(model, {"n_clean": len(clean_labels), "finetune_loss": losses})
