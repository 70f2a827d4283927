"""An adversarial term on top of a consistency method (latent adversarial distillation in the spirit of ADD/LADD,
arXiv 2403.12015): a discriminator whose heads read the frozen teacher's own intermediate features of a noised
latent (no DINOv2 or other download), trained by its own optimizer as a second update of the trainer.

Generator side: loss = base method's loss + lambda(step) * G(fake), seen through the teacher's features. The fake is
the method's (`Judged`): for LCD and TCD the student's one-step origin estimate (what a 1-step sample is), noised
at a random grid time t'; for PCM the student's phase-edge estimate f(z_t, t, s), carried on by the forward process
from s to a grid time t' of the phase above s (as in the PCM paper, arXiv 2405.18407). The real is the data noised
to t' (ADD/LADD), or with `adversarial_real = "target"` the method's target estimate of the same point, noised or
carried on alike (PCM's adversarial consistency loss).
Discriminator side (the next update, same micro-batch): D(real) against D(fake) with the hinge or non-saturating
loss. lambda ramps linearly from 0 to the weight over the warm-up; its counter lives in the discriminator's state, so
a resumed run continues the same schedule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lcmkit.methods.base import Batch, Judged, Nets

Features = Callable[[Tensor, Tensor, Any], list[Tensor]]
"""(noised latent, time, conditioning) -> the frozen teacher's feature maps (B, C, H, W) at its chosen layers."""


@dataclass
class AdversarialSettings:
    """The [adversarial] section."""

    adversarial_weight: float = 0.0
    """lambda, the weight of the adversarial term added to the method's loss (0: no adversarial term)."""
    adversarial_warmup: int = 500
    """Generator loss evaluations (steps x accumulation) over which lambda ramps up linearly from 0."""
    adversarial_loss: str = "hinge"
    """hinge or nonsaturating."""
    adversarial_real: str = "data"
    """What the student's sample is held against: data (the training latents, noised alike: ADD/LADD) or target
    (the method's own target estimate of the same point: PCM's adversarial consistency loss)."""
    discriminator_lr: float | None = None
    """Learning rate of the discriminator heads (AdamW, constant); default: the method's (LCD 1e-4, TCD and PCM
    1e-5)."""


class Discriminator(nn.Module):
    """One small head per teacher feature map: conv 3x3, GroupNorm, SiLU, conv 1x1 to one logit map, averaged over
    positions; the logits of all heads are summed."""

    def __init__(self, channels: list[int], width: int = 32):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU(),
                          nn.Conv2d(width, 1, 1))  # fmt: skip
            for c in channels
        )
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, features: list[Tensor]) -> Tensor:
        return sum(head(f.float()).mean(dim=(1, 2, 3)) for head, f in zip(self.heads, features))


def generator_term(logits: Tensor, kind: str) -> Tensor:
    return -logits.mean() if kind == "hinge" else nn.functional.softplus(-logits).mean()


def discriminator_term(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    if kind == "hinge":
        return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    return nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean()


class Adversarial:
    """A consistency method (LCD, TCD, PCM) plus the adversarial term; `discriminator_loss` is the second update."""

    def __init__(self, base: Any, settings: AdversarialSettings, discriminator: Discriminator, features: Features):
        self.base, self.settings, self.discriminator, self.features = base, settings, discriminator, features
        self.d_forward: nn.Module = discriminator
        """What the discriminator's own update calls: the accelerate-prepared module (DDP syncs its gradients)."""
        self.pending: deque[tuple[Tensor, Tensor, Tensor, Any]] = deque()

    def weight(self) -> float:
        s = self.settings
        ramp = min(1.0, float(self.discriminator.calls) / s.adversarial_warmup) if s.adversarial_warmup else 1.0
        return s.adversarial_weight * ramp

    def noised_pair(self, nets: Nets, batch: Batch, judged: Judged, generator: torch.Generator | None):
        """Real and fake latents noised alike at a time t' (same noise), as the discriminator sees them."""
        ode, fake, num_steps = nets.trajectory, judged.fake, self.base.settings.num_ddim_timesteps
        if judged.lo is None:  # one-step samples, noised at any grid time
            t, _ = ode.sample_pairs(fake.shape[0], num_steps, generator, fake.device)
        else:  # samples at grid index lo, carried on to a grid time in [lo, hi)
            grid = ode.grid(num_steps, fake.device)
            u = torch.rand(judged.lo.shape, generator=generator, device=fake.device)
            s, t = grid[judged.lo], grid[judged.lo + (u * (judged.hi - judged.lo)).long()]
        eps = torch.randn(fake.shape, generator=generator, device=fake.device)

        def noised(z: Tensor) -> Tensor:
            return ode.noised(z, eps, t) if judged.lo is None else ode.travelled(z, eps, s, t)

        data = self.settings.adversarial_real == "data"
        return ode.noised(batch.z0.float(), eps, t) if data else noised(judged.target), noised(fake), t

    def loss(self, nets: Nets, batch: Batch, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        loss, logs = self.base.loss(nets, batch, generator)
        real_t, fake_t, t = self.noised_pair(nets, batch, self.base.judged, generator)
        self.pending.append((real_t, fake_t.detach(), t, batch.cond))
        weight = self.weight()
        self.discriminator.calls += 1
        g = generator_term(self.discriminator(self.features(fake_t, t, batch.cond)), self.settings.adversarial_loss)
        return loss + weight * g, {**logs, "adversarial_g": g.detach(), "adversarial_weight": torch.tensor(weight)}

    def discriminator_loss(self, nets: Nets) -> tuple[Tensor, dict]:
        """The discriminator's loss on the real and fake latents of the oldest pending generator evaluation."""
        real_t, fake_t, t, cond = self.pending.popleft()
        with torch.no_grad():
            real_f, fake_f = self.features(real_t, t, cond), self.features(fake_t, t, cond)
        real, fake = self.d_forward(real_f), self.d_forward(fake_f)
        d = discriminator_term(real, fake, self.settings.adversarial_loss)
        return d, {"real_logit": real.detach().mean(), "fake_logit": fake.detach().mean()}
