"""Neural Attention Distillation (Li et al., "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks", ICLR 2021)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from eglib.defenses.base import Defense, DefenseContext, DefenseOutcome, register_defense
from eglib.defenses.ft import fine_tune
from eglib.defenses.loops import clean_reserve, poisoned_model, tune
from eglib.models.base import StagedNet
from eglib.params import check_bool, check_float, check_int
from eglib.train import TrainSettings


@contextmanager
def stage_outputs(model: StagedNet, stages: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the dict holds the latest output (with autograd) of each named stage.

    Hooks `model.stage_output_module(name)`, i.e. what the next stage sees (after a guard).
    """
    store: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            store[name] = output

        return hook

    handles = [model.stage_output_module(s).register_forward_hook(hook_for(s)) for s in stages]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """Attention of (B, C, H, W) features: mean over channels of |a|^p, flattened to (B, H*W)
    and L2-normalised per sample (Zagoruyko & Komodakis 2017)."""
    if features.dim() != 4:
        raise ValueError(f"attention maps need (B, C, H, W) features, got {tuple(features.shape)}")
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the NAD distillation term)."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@register_defense
class NeuralAttentionDistillation(Defense):
    """NAD: distil a fine-tuned teacher's attention into the backdoored model on clean data.

    Train on the poisoned data (the backdoored model); teacher = a copy fine-tuned on the
    clean reserve (as `ft`); student = the backdoored model trained on the clean reserve
    with cross-entropy + sum_i betas[i] * AT loss at `layers[i]` (attention map = mean over
    channels of |a|^p, L2-normalised; AT loss = mean squared difference). The student is
    returned.

    Parameters (defaults, BackdoorBench's CIFAR-10 config adapted): teacher_epochs=10
    (`te_epochs`), epochs=20 (student; the NAD paper's 20, BackdoorBench runs 100), lr=0.01,
    batch_size=64 (BackdoorBench 256: our reserve is small), betas=(500, 1000, 1000) and
    p=2.0 (`beta1..3`, `p`), layers=None (the last len(betas) stages, as BackdoorBench uses
    layer2..4 of PreAct-ResNet-18), hflip=False (crop augmentation only, as the project's
    defence table runs it; hflip=True adds random horizontal flips to both phases, an option
    for data whose classes survive a flip). Weight decay is 5e-4 in both phases (the
    project's training recipe, `TrainSettings` and `tune`), not BackdoorBench's 1e-4, and is
    not a parameter; the recorded results used 5e-4. CPU budget: both phases see only the
    clean reserve, about one main-training epoch of work in total on our profiles.
    """

    name = "nad"
    stage = "post"
    needs_clean_data = True
    starts_from_poisoned_model = True

    def __init__(
        self,
        teacher_epochs: int = 10,
        epochs: int = 20,
        lr: float = 0.01,
        batch_size: int = 64,
        betas: Sequence[float] = (500.0, 1000.0, 1000.0),
        p: float = 2.0,
        layers: Sequence[str] | None = None,
        hflip: bool = False,
    ) -> None:
        self.teacher_epochs = check_int("teacher_epochs", teacher_epochs, 1)
        self.epochs = check_int("epochs", epochs, 1)
        self.lr = check_float("lr", lr, low=0.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 2)
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or not betas:
            raise ValueError(f"betas={betas!r}; must be a non-empty sequence of numbers >= 0")
        self.betas = [check_float(f"betas[{i}]", b, low=0.0) for i, b in enumerate(betas)]
        self.p = check_float("p", p, low=0.0, low_open=True)
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(s, str) for s in layers):
                raise ValueError(f"layers={layers!r}; must be None or a sequence of stage names")
            if len(layers) != len(self.betas):
                raise ValueError(
                    f"layers={list(layers)} has {len(layers)} entries but betas has "
                    f"{len(self.betas)}; give one beta per layer"
                )
        self.layers = None if layers is None else list(layers)
        self.hflip = check_bool("hflip", hflip)

    def resolve_layers(self, model: StagedNet) -> list[str]:
        """The stages distilled on `model` (KeyError / ValueError if they do not fit it)."""
        if self.layers is None:
            if len(model.stages) < len(self.betas):
                raise ValueError(
                    f"{len(self.betas)} betas but the model has only {len(model.stages)} stages "
                    f"{list(model.stages)}; pass fewer betas or explicit layers"
                )
            return list(model.stages[-len(self.betas) :])
        for name in self.layers:
            model.stage(name)
        return list(self.layers)

    def check_model(self, model: StagedNet) -> None:
        """ValueError if `layers` (or the betas' count) do not fit the model's stages."""
        try:
            self.resolve_layers(model)
        except KeyError as error:
            raise ValueError(f"layers={self.layers!r}: {error.args[0]}") from None

    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Train, fine-tune a teacher copy, distil its attention into the backdoored model."""
        images, labels = clean_reserve(ctx, self.name)
        layers = self.resolve_layers(self.build_model(ctx))  # fail before the long training
        model = poisoned_model(self, ctx)
        teacher = copy.deepcopy(model)
        settings = TrainSettings(
            epochs=self.teacher_epochs, batch_size=self.batch_size, lr=self.lr, hflip=self.hflip
        )
        teacher_loss = fine_tune(ctx, teacher, settings, self.name)
        teacher.to(ctx.device).eval()
        with (
            stage_outputs(model, layers) as student_out,
            stage_outputs(teacher, layers) as teacher_out,
        ):

            def nad_loss(student: StagedNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                loss = F.cross_entropy(student(x), y)
                with torch.no_grad():
                    teacher(x)
                for beta, name in zip(self.betas, layers, strict=True):
                    loss = loss + beta * attention_loss(
                        student_out[name], teacher_out[name], self.p
                    )
                return loss

            student_loss = tune(
                model,
                images,
                labels,
                nad_loss,
                epochs=self.epochs,
                lr=self.lr,
                batch_size=self.batch_size,
                seed=ctx.seed,
                device=ctx.device,
                hflip=self.hflip,
                progress=ctx.progress,
                desc="nad",
            )
        info = {"layers": layers, "teacher_loss": teacher_loss, "student_loss": student_loss}
        return DefenseOutcome(model, info)
