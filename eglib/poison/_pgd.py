"""Untargeted L_inf PGD (Madry et al. 2018): push images away from their own label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pgd_away(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Float images (N, C, H, W) in [0, 1] that maximise the cross-entropy of `model` on `labels`.

    Signed-gradient ascent with step `step_size`, projected after each step onto the L_inf
    ball of radius `eps` around `images` and onto [0, 1]. With a `generator` the start is
    uniform in the ball (drawn for all N images at once, so the result does not depend on
    `batch_size`); without one it starts at `images`. `model` must be in eval mode; its
    parameters get no gradients. Runs on the images' device, in batches of `batch_size`.
    """
    if images.shape[0] == 0:
        return images.clone()
    start = images.clone()
    if generator is not None:
        noise = torch.rand(images.shape, generator=generator, device=generator.device)
        start = (images + (noise.to(images.device) * 2 - 1) * eps).clamp(0, 1)
    out = []
    for lo in range(0, images.shape[0], batch_size):  # loop over batches
        clean, y = images[lo : lo + batch_size], labels[lo : lo + batch_size]
        x = start[lo : lo + batch_size]
        for _ in range(steps):  # loop over PGD steps
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + step_size * grad.sign()
            x = torch.minimum(torch.maximum(x, clean - eps), clean + eps).clamp(0, 1)
        out.append(x.detach())
    return torch.cat(out)
