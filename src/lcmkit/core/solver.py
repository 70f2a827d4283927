"""ODE solver steps of the teacher's probability-flow ODE, and classifier-free guidance in the LCM convention."""

from __future__ import annotations

from torch import Tensor

from lcmkit.core.prediction import predicted_noise, predicted_origin


def ddim_step(x0_hat: Tensor, eps_hat: Tensor, alpha_prev: Tensor, sigma_prev: Tensor) -> Tensor:
    """Deterministic DDIM update to the earlier timestep: z_prev = alpha_prev x0 + sigma_prev eps."""
    return alpha_prev * x0_hat + sigma_prev * eps_hat


def guidance_scale(w: float) -> float:
    """diffusers' guidance_scale of the LCM paper's w: w + 1. The paper guides as cond + w (cond - uncond) (eq. 7),
    diffusers as uncond + s (cond - uncond), so s = w + 1; LatentConsistencyModelPipeline embeds s - 1 = w."""
    return w + 1.0


def w_of(guidance_scale: float) -> float:
    """The LCM paper's w of a diffusers guidance_scale (the inverse of guidance_scale())."""
    return guidance_scale - 1.0


def guided(cond: Tensor, uncond: Tensor, w: Tensor) -> Tensor:
    """cond + w (cond - uncond): the LCM paper's w (eq. 7), i.e. classifier-free scale w + 1 (guidance_scale)."""
    return cond + w * (cond - uncond)


def guided_ddim_step(
    out_cond: Tensor,
    out_uncond: Tensor,
    z_t: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_prev: Tensor,
    sigma_prev: Tensor,
    w: Tensor,
    prediction_type: str,
) -> Tensor:
    """One DDIM step of the guided teacher from t to the earlier t_prev (LCM paper eq. 8, Psi = DDIM): the
    conditional and unconditional outputs become (x0_hat, eps_hat), each is guided with w, then one DDIM update."""
    x0 = guided(
        predicted_origin(out_cond, z_t, alpha_t, sigma_t, prediction_type),
        predicted_origin(out_uncond, z_t, alpha_t, sigma_t, prediction_type),
        w,
    )
    eps = guided(
        predicted_noise(out_cond, z_t, alpha_t, sigma_t, prediction_type),
        predicted_noise(out_uncond, z_t, alpha_t, sigma_t, prediction_type),
        w,
    )
    return ddim_step(x0, eps, alpha_prev, sigma_prev)
