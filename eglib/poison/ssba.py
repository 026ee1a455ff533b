"""SSBA (Li et al. 2021): an invisible, sample-specific trigger from a steganography encoder."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eglib.config import default_device
from eglib.data import to_float
from eglib.params import check_float, check_int
from eglib.poison._fitted import FittedAttack, State, load_module_state, module_state, seeded
from eglib.poison.base import register_attack
from eglib.poison.ops import to_uint8


def _conv(c_in: int, c_out: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    """3x3 convolution ('same' padding) (+ BatchNorm) + ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride, 1)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class StegaEncoder(nn.Module):
    """A tiny StegaStamp-style U-net: (image, bits) -> residual bounded by `max_residual`.

    The bits go through a dense layer to one full-size plane per image channel, are stacked
    with the centred image, and pass a 3-level U-net (widths `width`, 2x, 4x; skips by
    concatenation; upsampling to the skip's size, so any H, W work). The last 1x1 convolution
    is squashed by `max_residual * tanh`, so |residual| <= max_residual everywhere.
    Input: float images (N, C, H, W) in [0, 1], bits (N, n_bits) in {0, 1}.
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width_px: int,
        n_bits: int,
        width: int,
        max_residual: float,
    ) -> None:
        super().__init__()
        self.shape = (channels, height, width_px)
        self.max_residual = max_residual
        self.secret = nn.Sequential(nn.Linear(n_bits, channels * height * width_px), nn.ReLU())
        self.down1 = _conv(2 * channels, width)
        self.down2 = _conv(width, 2 * width, stride=2)
        self.down3 = _conv(2 * width, 4 * width, stride=2)
        self.up2 = _conv(4 * width, 2 * width)
        self.merge2 = _conv(4 * width, 2 * width)
        self.up1 = _conv(2 * width, width)
        self.merge1 = _conv(2 * width + 2 * channels, width)
        self.residual = nn.Conv2d(width, channels, 1)

    def forward(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The residual (N, C, H, W) to add to `images`."""
        plane = self.secret(bits - 0.5).view(-1, *self.shape)
        inputs = torch.cat([images - 0.5, plane], dim=1)
        d1 = self.down1(inputs)
        d2 = self.down2(d1)
        d3 = self.down3(d2)
        u2 = self.up2(F.interpolate(d3, size=d2.shape[-2:], mode="nearest"))
        m2 = self.merge2(torch.cat([d2, u2], dim=1))
        u1 = self.up1(F.interpolate(m2, size=d1.shape[-2:], mode="nearest"))
        m1 = self.merge1(torch.cat([d1, u1, inputs], dim=1))
        return self.max_residual * torch.tanh(self.residual(m1))


class StegaDecoder(nn.Sequential):
    """A small CNN with BatchNorm: encoded float image (N, C, H, W) -> bit logits (N, n_bits).

    (BatchNorm makes it read the faint residual within ~100 steps instead of idling on a
    plateau for a seed-dependent few hundred.)
    """

    def __init__(self, channels: int, n_bits: int, width: int) -> None:
        super().__init__(
            _conv(channels, width, stride=2, norm=True),
            _conv(width, 2 * width, stride=2, norm=True),
            _conv(2 * width, 2 * width, stride=2, norm=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, n_bits),
        )


@register_attack
class SSBA(FittedAttack):
    """Sample-specific invisible trigger: x + encoder(x, code), one fixed code for every image.

    `fit` trains a steganography encoder/decoder pair on the clean training images to hide
    random `bits`-bit codes (random codes, so the decoder must read the image and cannot just
    memorise one answer) and draws the attack's fixed code. Loss per step: `bit_weight` x
    BCE(decoder(clip(x + r)), code) + `l2_weight` x mean(r^2); the first tenth of the steps
    train on the bit loss only. Adam, `lr`, `fit_steps` steps of `fit_batch_size` random
    images. `apply` = round(255 x clip(x + encoder(x, code), 0, 1)): the residual depends on
    the image (sample-specific), |residual| <= `max_residual` (so every pixel moves by at
    most ceil(255 x max_residual) levels), no randomness.

    Source defaults (BackdoorBox `core/attacks/ISSBA.py`, after Tancik et al.'s StegaStamp;
    BackdoorBench ships precomputed images): secret size 20 bits, Adam lr 1e-4, batch 32,
    20 epochs of which the first 2 on the secret loss only, loss 2.0 L2 + 1.5 LPIPS + 1.5
    BCE (+ 0.5 critic, off by default), encoder a 5-level U-net with a dense secret layer,
    decoder with a spatial transformer; all-to-one, target 0, rate 0.1.
    Adaptation (CPU, 28 px gray / 32 px colour): a 3-level U-net of width 16 and a 3-conv
    decoder with BatchNorm and without spatial transformer; no LPIPS (it needs pretrained
    AlexNet weights) and no critic; instead a hard bound max_residual * tanh on the residual
    (0.05, about 13/255) keeps it invisible; lr 1e-3 for a budget of a few thousand steps
    instead of 30 000.
    """

    name = "ssba"
    fit_param_names: ClassVar[tuple[str, ...]] = (
        "bits",
        "max_residual",
        "width",
        "fit_steps",
        "fit_batch_size",
        "lr",
        "l2_weight",
        "bit_weight",
    )
    quick_params: ClassVar[dict[str, Any]] = {
        "fit_size": 512,
        "fit_steps": 100,
        "bits": 8,
        "width": 8,
        "lr": 3e-3,
    }

    def __init__(
        self,
        *,
        bits: int = 20,
        max_residual: float = 0.05,
        width: int = 16,
        fit_steps: int = 2000,
        fit_batch_size: int = 32,
        lr: float = 1e-3,
        l2_weight: float = 2.0,
        bit_weight: float = 1.5,
        batch_size: int = 512,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        for label, value in (
            ("bits", bits),
            ("width", width),
            ("fit_steps", fit_steps),
            ("fit_batch_size", fit_batch_size),
            ("batch_size", batch_size),
        ):
            check_int(label, value, 1)
        check_float("max_residual", max_residual, low=1e-6, high=1.0)
        check_float("lr", lr, low=1e-8, high=1.0)
        check_float("l2_weight", l2_weight, low=0.0, high=1e6)
        check_float("bit_weight", bit_weight, low=1e-6, high=1e6)
        self.bits = bits
        self.max_residual = float(max_residual)
        self.width = width
        self.fit_steps = fit_steps
        self.fit_batch_size = fit_batch_size
        self.lr = float(lr)
        self.l2_weight = float(l2_weight)
        self.bit_weight = float(bit_weight)
        self.batch_size = batch_size
        self._encoder: StegaEncoder | None = None
        self._decoder: StegaDecoder | None = None
        self._code: torch.Tensor | None = None

    def _networks(self, shape: tuple[int, ...]) -> tuple[StegaEncoder, StegaDecoder]:
        channels, height, width_px = shape
        encoder = StegaEncoder(channels, height, width_px, self.bits, self.width, self.max_residual)
        return encoder, StegaDecoder(channels, self.bits, self.width)

    def _train(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> State:
        """Train encoder + decoder to hide random codes; draw the attack's code."""
        generator = torch.Generator().manual_seed(seed)
        device = default_device()
        with seeded(seed):
            encoder, decoder = self._networks(tuple(images.shape[1:]))
        encoder.to(device).train()
        decoder.to(device).train()
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=self.lr)
        data = images.to(device)
        warmup = self.fit_steps // 10
        for step in tqdm(range(self.fit_steps), desc="ssba fit", disable=not self._progress):
            idx = torch.randint(0, len(data), (self.fit_batch_size,), generator=generator)
            code = torch.randint(0, 2, (self.fit_batch_size, self.bits), generator=generator)
            x, code = to_float(data[idx.to(device)]), code.to(device, torch.float32)
            residual = encoder(x, code)
            logits = decoder((x + residual).clamp(0, 1))
            loss = self.bit_weight * F.binary_cross_entropy_with_logits(logits, code)
            if step >= warmup:
                loss = loss + self.l2_weight * residual.square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        code = torch.randint(0, 2, (self.bits,), generator=generator).to(torch.float32)
        return {
            **module_state("encoder", encoder),
            **module_state("decoder", decoder),
            "code": code,
        }

    def _load(self, state: State) -> None:
        """Rebuild encoder and decoder; keep the code."""
        assert self._shape is not None
        encoder, decoder = self._networks(self._shape)
        self._encoder = load_module_state("encoder", encoder, state)
        self._decoder = load_module_state("decoder", decoder, state)
        self._code = state["code"]

    @property
    def code(self) -> torch.Tensor:
        """The fixed float (bits,) code in {0, 1} every triggered image carries."""
        if self._code is None:
            raise RuntimeError(f"attack {self.name!r} is not fitted: call fit before reading code")
        return self._code

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """Float residuals (N, C, H, W) the encoder adds to uint8 `images` for the fixed code."""
        self._require_fit(images)
        assert self._encoder is not None
        encoder = self._encoder.to(images.device)
        code = self.code.to(images.device)
        out = []
        with torch.no_grad():
            for lo in range(0, len(images), self.batch_size):  # loop over batches
                x = to_float(images[lo : lo + self.batch_size])
                out.append(encoder(x, code.expand(len(x), -1)))
        return torch.cat(out) if out else torch.zeros(images.shape, device=images.device)

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Bit logits (N, bits) the decoder reads from uint8 `images`."""
        self._require_fit(images)
        assert self._decoder is not None
        with torch.no_grad():
            return self._decoder.to(images.device)(to_float(images))

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of uint8 `images` carrying the code: round(255 * clip(x + residual(x)))."""
        residual = self.residual(images)
        return to_uint8((to_float(images) + residual).clamp(0, 1) * 255)
