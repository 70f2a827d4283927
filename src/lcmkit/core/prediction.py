"""Parameterisations: a denoiser's raw output (eps, v or x0) converted to the predicted origin and noise."""

from __future__ import annotations

from torch import Tensor


def predicted_origin(model_output: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x0_hat from the UNet output (alpha, sigma already broadcastable against z_t)."""
    if prediction_type == "epsilon":
        return (z_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * z_t - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_noise(model_output: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """eps_hat from the UNet output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * z_t
    if prediction_type == "sample":
        return (z_t - alpha * model_output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
