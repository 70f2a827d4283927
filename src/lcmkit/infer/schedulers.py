"""Samplers: the teacher's (DDIM, DPM-Solver++, Euler) and a distilled model's (LCMScheduler, TCDScheduler; for a
rectified-flow model FlowMatchLCMScheduler, or Euler on its training grid)."""

from __future__ import annotations

from typing import Any

SAMPLERS = ("ddim", "dpm++", "euler")


LCM_SAMPLERS = ("lcm", "tcd", "euler")
"""A distilled model's samplers: lcm (LCMScheduler; a flow model's FlowMatchLCMScheduler), tcd (TCDScheduler, UNet
models) and euler (a flow model's deterministic sampler: FlowMatchEulerDiscreteScheduler on its training grid, what
TCD at gamma 0 is for a flow model and what a flow PCM student was trained for)."""


def is_flow(config: Any) -> bool:
    """Whether a scheduler config is a rectified-flow one (SD3, FLUX: diffusers' FlowMatch* schedulers)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def reference_sampler(config: Any) -> str:
    """The teacher's deterministic many-step sampler that evaluations compare against: DDIM, or a flow teacher's
    own Euler."""
    return "euler" if is_flow(config) else "ddim"


def teacher_scheduler(config: Any, sampler: str) -> Any:
    """The teacher's noise schedule under DDIM, DPM-Solver++ (2nd order multistep) or Euler. A flow teacher: Euler
    is its own FlowMatchEulerDiscreteScheduler, DPM-Solver++ runs on its flow sigmas (same shift); DDIM is refused."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if is_flow(config):
        return flow_teacher_scheduler(config, sampler)
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if sampler == "ddim":  # DDIM's default clip_sample=True would clip latents to [-1, 1]: SD configs set False
        return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    from lcmkit.errors import ConfigError

    raise ConfigError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def flow_teacher_scheduler(config: Any, sampler: str) -> Any:
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_flow_sigmas=True,
                                                       prediction_type="flow_prediction",
                                                       flow_shift=config.get("shift", 1.0))  # fmt: skip
    from lcmkit.errors import ConfigError

    raise ConfigError(f"sampler {sampler!r} for a rectified-flow teacher: choose euler or dpm++")


def few_step_scheduler(config: Any, sampler: str) -> Any:
    """A distilled model's sampler over `config`'s noise schedule: LCMScheduler (the LCM paper's multistep
    consistency sampling), or TCDScheduler (Zheng et al. 2024's strategic stochastic sampling: each step goes
    back to an intermediate time set by gamma, passed to the pipeline as eta; gamma 1 is LCM's sampling).
    A rectified-flow model: FlowMatchLCMScheduler (lcm), or FlowMatchEulerDiscreteScheduler (euler; the caller
    passes the grid's sigmas, infer/sampling.grid_sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler, TCDScheduler

    from lcmkit.errors import ConfigError

    if sampler not in LCM_SAMPLERS:
        raise ConfigError(f"sampler {sampler!r}: choose one of {', '.join(LCM_SAMPLERS)}")
    if is_flow(config):
        if sampler == "tcd":
            raise ConfigError("--scheduler tcd: diffusers has no TCD scheduler for a rectified-flow model (SD3, "
                              "FLUX); use lcm, or euler (deterministic: TCD at gamma 0)")  # fmt: skip
        return (FlowMatchLCMScheduler if sampler == "lcm" else FlowMatchEulerDiscreteScheduler).from_config(config)
    if sampler == "euler":
        raise ConfigError("sampler euler is a rectified-flow model's deterministic sampler; a UNet model's is TCD "
                          "at gamma 0: --scheduler tcd --tcd-gamma 0 (eval: --lcm-samplers tcd)")  # fmt: skip
    return (LCMScheduler if sampler == "lcm" else TCDScheduler).from_config(config)


def with_sampler(pipe: Any, sampler: str) -> Any:
    """A pipeline sharing `pipe`'s models, on the distilled-model `sampler` (see few_step_scheduler)."""
    twin = type(pipe).from_pipe(pipe, scheduler=few_step_scheduler(pipe.scheduler.config, sampler))
    twin.set_progress_bar_config(disable=True)
    return twin


def check_tcd_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        from lcmkit.errors import ConfigError

        raise ConfigError(f"--tcd-gamma {gamma}: must be between 0 and 1 (0.3 is TCD's default)")
