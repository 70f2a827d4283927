"""The consistency parameterisation (boundary condition), the guidance embedding and the distance."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lcmkit.core.prediction import predicted_origin
from lcmkit.core.schedule import NoiseSchedule, append_dims


def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """c_skip(t), c_out(t) with c_skip(0) ~ 1 and c_out(0) = 0 (LCM paper eq. 9 / CM paper app. C)."""
    st = timestep_scaling * t.double()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def guidance_scale_embedding(w: Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of w (scaled by 1000), as LatentConsistencyModelPipeline feeds
    `timestep_cond` (there w = guidance_scale - 1, so training w maps to guidance_scale w + 1)."""
    half = embedding_dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=dtype, device=w.device))
    angles = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if embedding_dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-element sqrt((pred - target)^2 + c^2) - c (Song & Dhariwal 2023, eq. 9 without the 1/c)."""
    return ((pred - target) ** 2 + c**2).sqrt() - c


def consistency_function(
    model_output: Tensor,
    z_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    prediction_type: str,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t), in float32 (LCM paper eq. 9)."""
    alpha, sigma = (append_dims(s, z_t.ndim) for s in schedule.alpha_sigma(t))
    c_skip, c_out = (append_dims(s, z_t.ndim) for s in boundary_scalings(t, sigma_data, timestep_scaling))
    x0_hat = predicted_origin(model_output.float(), z_t, alpha, sigma, prediction_type)
    return c_skip * z_t + c_out * x0_hat
