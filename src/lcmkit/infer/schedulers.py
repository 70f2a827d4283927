"""Samplers: the teacher's (DDIM, DPM-Solver++) and a distilled model's (LCMScheduler, TCDScheduler)."""

from __future__ import annotations

from typing import Any

SAMPLERS = ("ddim", "dpm++")


LCM_SAMPLERS = ("lcm", "tcd")


def teacher_scheduler(config: Any, sampler: str) -> Any:
    """The teacher's noise schedule under DDIM or DPM-Solver++ (2nd order multistep)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":  # DDIM's default clip_sample=True would clip latents to [-1, 1]: SD configs set False
        return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    from lcmkit.errors import ConfigError

    raise ConfigError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def few_step_scheduler(config: Any, sampler: str) -> Any:
    """A distilled model's sampler over `config`'s noise schedule: LCMScheduler (the LCM paper's multistep
    consistency sampling), or TCDScheduler (Zheng et al. 2024's strategic stochastic sampling: each step goes
    back to an intermediate time set by gamma, passed to the pipeline as eta; gamma 1 is LCM's sampling)."""
    from diffusers import LCMScheduler, TCDScheduler

    if sampler not in LCM_SAMPLERS:
        from lcmkit.errors import ConfigError

        raise ConfigError(f"sampler {sampler!r}: choose one of {', '.join(LCM_SAMPLERS)}")
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
