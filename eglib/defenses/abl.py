"""Anti-Backdoor Learning (Li et al., "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from eglib.defenses.base import Defense, DefenseContext, DefenseOutcome, register_defense
from eglib.defenses.detection import detection_report
from eglib.defenses.loops import LossFn, per_sample_loss, train_phase, tune
from eglib.models.base import StagedNet
from eglib.params import check_bool, check_float, check_int


def lga_loss(gamma: float) -> LossFn:
    """Local gradient ascent loss: sign(CE - gamma) * CE on the batch's mean cross-entropy.

    Below `gamma` the loss is ascended, so samples learnt too fast (the backdoor) stay near
    gamma while the rest is learnt normally; the gap isolates them.
    """

    def loss(model: StagedNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(model(x), y)
        return torch.sign(ce - gamma) * ce

    return loss


def unlearning_loss(model: StagedNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative cross-entropy: minimising it is gradient ascent on the isolated samples."""
    return -F.cross_entropy(model(x), y)


@register_defense
class AntiBackdoorLearning(Defense):
    """ABL: isolate the lowest-loss samples early, train on the rest, unlearn the isolated.

    1. Isolation: train a fresh model for `isolation_epochs` with the LGA loss
       sign(CE - gamma) * CE (own loop: SGD nesterov, constant lr `isolation_lr`), on the
       images as they are (`isolation_augment=False`: BackdoorBench's `pre_train` and the
       authors' code use the test transform here; a random crop moves a patch trigger, which
       slows the backdoor's learning, the very signal isolation reads).
    2. Per-sample cross-entropy of every training sample (eval mode, no augmentation); the
       `isolation_ratio` fraction with the lowest loss (at least 2 samples, one BatchNorm
       batch) is isolated: the suspected poison.
    3. Continue training the same model on the other samples with the run's own recipe
       (`ctx.train`: the run's epochs, lr and augmentation).
    4. Unlearning: `unlearning_epochs` of gradient ascent (minimising -CE) on the isolated
       samples, constant lr `unlearning_lr`.
    The isolation's detection quality (score = minus the loss) is reported in info.

    Parameters (defaults, BackdoorBench's CIFAR-10 config adapted): isolation_ratio=0.01,
    gamma=0.5 (LGA, the paper's loss; both reference codes default to a Flooding variant),
    unlearning_epochs=20 (BackdoorBench; the ABL authors' code runs 5, the first of which
    only evaluates), unlearning_lr=5e-4 (the ABL authors'; BackdoorBench's config says 5e-4
    but its schedule uses 1e-4): five times the unlearning epochs x rate of either reference.
    At full scale BackdoorBench's effective 1e-4 gave no clean, accurate model either
    (figures/full/abl_unlearning_lr/), isolation_epochs=5 (BackdoorBench `tuning_epochs:
    20`; fewer for the CPU budget), isolation_lr=0.05 (the run's default lr; BackdoorBench
    0.01, the ABL paper 0.1), isolation_augment=False (True: random crops, and flips with
    `hflip`, during isolation, as eglib did before 2026-11-27: the ABL results committed
    before then were isolated that way), batch_size=128, hflip=False, weight decay 5e-4
    (BackdoorBench 1e-4). Step 3 replaces BackdoorBench's 60 fine-tuning epochs.
    """

    name = "abl"
    stage = "training"

    def __init__(
        self,
        isolation_epochs: int = 5,
        isolation_ratio: float = 0.01,
        gamma: float = 0.5,
        isolation_lr: float = 0.05,
        unlearning_epochs: int = 20,
        unlearning_lr: float = 5e-4,
        batch_size: int = 128,
        hflip: bool = False,
        isolation_augment: bool = False,
    ) -> None:
        self.isolation_epochs = check_int("isolation_epochs", isolation_epochs, 1)
        self.isolation_ratio = check_float(
            "isolation_ratio", isolation_ratio, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.gamma = check_float("gamma", gamma, low=0.0)
        self.isolation_lr = check_float("isolation_lr", isolation_lr, low=0.0, low_open=True)
        self.unlearning_epochs = check_int("unlearning_epochs", unlearning_epochs, 0)
        self.unlearning_lr = check_float("unlearning_lr", unlearning_lr, low=0.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 2)
        self.hflip = check_bool("hflip", hflip)
        self.isolation_augment = check_bool("isolation_augment", isolation_augment)

    def isolate(self, model: StagedNet, ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Isolation phase on a fresh `model`: (isolated mask (N,), per-sample losses (N,))."""
        tune(
            model,
            ctx.images,
            ctx.labels,
            lga_loss(self.gamma),
            epochs=self.isolation_epochs,
            lr=self.isolation_lr,
            batch_size=self.batch_size,
            seed=ctx.seed,
            device=ctx.device,
            cosine=False,
            augment_data=self.isolation_augment,
            hflip=self.hflip,
            progress=ctx.progress,
            desc="abl isolation",
        )
        losses = per_sample_loss(model, ctx.images, ctx.labels, device=ctx.device)
        count = max(2, int(self.isolation_ratio * len(losses) + 0.5))  # 2: one BatchNorm batch
        isolated = torch.zeros(len(losses), dtype=torch.bool)
        isolated[losses.topk(count, largest=False).indices] = True
        return isolated, losses

    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Isolate, train on the rest, unlearn the isolated samples."""
        model = self.build_model(ctx)
        isolated, losses = self.isolate(model, ctx)
        train_phase(ctx, model, "abl-train", keep=~isolated)
        unlearn: list[float] = []
        if self.unlearning_epochs:
            unlearn = tune(
                model,
                ctx.images[isolated],
                ctx.labels[isolated],
                unlearning_loss,
                epochs=self.unlearning_epochs,
                lr=self.unlearning_lr,
                batch_size=self.batch_size,
                seed=ctx.seed,
                device=ctx.device,
                cosine=False,
                hflip=self.hflip,
                progress=ctx.progress,
                desc="abl unlearning",
            )
        info = {
            "n_isolated": int(isolated.sum()),
            "isolation": detection_report(-losses, ctx.poison_idx, isolated),
            "unlearning_loss": unlearn,
        }
        return DefenseOutcome(model, info)
