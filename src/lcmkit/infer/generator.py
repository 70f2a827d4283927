"""Few-step generation with an LCM UNet or an LCM-LoRA (`lcmkit generate`, serve and the Python API)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lcmkit.families import family_of_pipeline
from lcmkit.families.base import Family
from lcmkit.infer.fast_vae import subpixel_vae_decoder
from lcmkit.infer.loras import check_lora_matches
from lcmkit.infer.pipelines import compile_for_inference, denoiser_of, lcm_pipeline, run_batched
from lcmkit.infer.sampling import (
    DEFAULT_TCD_GAMMA,
    default_guidance_scale,
    full_lcm_ddim_timesteps,
    grid_sigmas,
    lcm_lora_ddim_timesteps,
)  # fmt: skip
from lcmkit.infer.schedulers import LCM_SAMPLERS, check_tcd_gamma, few_step_scheduler, teacher_scheduler
from lcmkit.runtime import dtype_kwarg, pick_device, pick_dtype
from lcmkit.safe_load import lora_file


class FewStepGenerator:
    """Few-step generation from a base model plus LoRAs (an LCM-LoRA and optional style LoRAs, with
    weights), or from a full LCM. Text-to-image and img2img, LCMScheduler or TCDScheduler."""

    def __init__(
        self,
        base: str | None = None,
        loras: list[tuple[str, float]] | None = None,
        lcm: str | None = None,
        scheduler: str = "lcm",
        device: str = "auto",
        dtype: str = "auto",
        base_config: str | None = None,
        num_ddim_timesteps: int | None = None,
        allow_pickle: bool = False,
        compile: bool = False,
        tcd_gamma: float = DEFAULT_TCD_GAMMA,
    ):
        from lcmkit.errors import ConfigError
        from lcmkit.families.teacher import ModelConfig, load_teacher

        loras = loras or []
        if bool(base) == bool(lcm):
            raise ConfigError("give either --base (with --lora) or --lcm (a full LCM folder)")
        if scheduler not in LCM_SAMPLERS:
            raise ConfigError(f"--scheduler {scheduler!r}: choose one of {', '.join(LCM_SAMPLERS)}")
        check_tcd_gamma(tcd_gamma)
        self.tcd_gamma = tcd_gamma
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.full = lcm is not None
        if lcm is not None:
            self.pipe, self.family_spec = self._load_full(lcm, base_config, allow_pickle)
            self.num_ddim_timesteps = num_ddim_timesteps or full_lcm_ddim_timesteps(lcm)
        else:
            teacher = load_teacher(ModelConfig(teacher=base, teacher_config=base_config, allow_pickle=allow_pickle))
            self.family_spec = teacher.family
            self.num_ddim_timesteps = num_ddim_timesteps or lcm_lora_ddim_timesteps(loras)
            self.pipe = lcm_pipeline(teacher, teacher.denoiser, self.num_ddim_timesteps)
        self.family = self.family_spec.name
        self.adapters: list[tuple[str, float]] = []
        for i, (path, weight) in enumerate(loras):
            file = lora_file(path, allow_pickle)
            check_lora_matches(denoiser_of(self.pipe), file, self.family_spec)
            name = f"lora{i}"
            self.pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
            self.adapters.append((name, weight))
        if self.adapters:
            self.pipe.set_adapters([n for n, _ in self.adapters], adapter_weights=[w for _, w in self.adapters])
        self.set_scheduler(scheduler)
        self.pipe.to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.subpixel_upsamplers = subpixel_vae_decoder(self.pipe.vae) if self.device == "cpu" else 0
        self._img2img: Any = None
        self.compiled = compile
        if compile:
            if self.adapters:  # frozen into the compiled graph: fuse them first (no teacher view afterwards)
                self.pipe.fuse_lora(adapter_names=[n for n, _ in self.adapters])
                self.pipe.unload_lora_weights()
                self.adapters = []
            compile_for_inference(self.pipe)

    @staticmethod
    def _load_full(lcm: str, config: str | None = None, allow_pickle: bool = False) -> tuple[Any, Family]:
        """A full LCM: a distill output folder, its pipeline/ folder, or a single .safetensors file written by
        `lcmkit export single-file` (with `config`, a diffusers folder or hub id holding the configs)."""
        from diffusers import DiffusionPipeline

        from lcmkit.errors import ConfigError
        from lcmkit.safe_load import check_weights_folder, weights_file

        folder = Path(lcm).expanduser()
        if folder.is_file():
            folder = weights_file(folder, "--lcm", allow_pickle)
            if not config:
                raise ConfigError(f"--lcm {lcm} is a single file: pass --base-config (a diffusers folder or hub id "
                                  "of the same architecture) for its configs")  # fmt: skip
            from lcmkit.families.single_file import import_single_file

            try:
                pipe = import_single_file(folder, config)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"--lcm {lcm}: cannot load it as a single-file checkpoint ({e})") from None
        else:
            if (folder / "pipeline" / "model_index.json").is_file():
                folder = folder / "pipeline"
            if not (folder / "model_index.json").is_file():
                raise ConfigError(f"--lcm {lcm}: not a full LCM (a pipeline folder, pipeline/ inside a distill "
                                  "output, or a single .safetensors file)")  # fmt: skip
            check_weights_folder(folder, "--lcm", allow_pickle)
            pipe = DiffusionPipeline.from_pretrained(
                folder, **dtype_kwarg(torch.float32), use_safetensors=None if allow_pickle else True
            )
        family = family_of_pipeline(pipe)
        if family.flow and type(pipe.scheduler).__name__ != "FlowMatchLCMScheduler":
            raise ConfigError(f"--lcm {lcm}: its scheduler is {type(pipe.scheduler).__name__}, not "
                              "FlowMatchLCMScheduler (what lcmkit saves a full flow student with): not a full LCM")
        if not family.flow and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None:
            raise ConfigError(f"--lcm {lcm}: its UNet has no guidance input (time_cond_proj_dim): not a full LCM")
        # One code path: the family's plain pipeline feeds guidance_scale - 1 to timestep_cond and runs no CFG for
        # such a UNet, and (unlike LatentConsistencyModelPipeline) passes TCD's gamma to the scheduler.
        return family.pipeline_class().from_pipe(pipe), family

    def check_size(self, width: int | None, height: int | None) -> None:
        """Refuse a size the VAE cannot make exactly (diffusers would silently make a smaller image)."""
        from lcmkit.errors import ConfigError

        block = int(self.pipe.vae_scale_factor)
        for flag, value in (("--width", width), ("--height", height)):
            if value is not None and (value < block or value % block):
                lower, upper = max(block, value // block * block), (value // block + 1) * block
                raise ConfigError(f"{flag} {value}: must be a multiple of {block} for this model (its VAE works in "
                                  f"{block}x{block} pixel blocks): use {lower} or {upper}")  # fmt: skip

    def set_scheduler(self, name: str) -> None:
        self.pipe.scheduler = few_step_scheduler(self.pipe.scheduler.config, name)
        self.scheduler_name = name

    @property
    def default_guidance(self) -> float:
        """Full LCM: the w input (diffusers' default); LCM-LoRA: 1 (no classifier-free guidance)."""
        return default_guidance_scale(self.full, self.family_spec)

    def __call__(
        self,
        prompts: list[str],
        negative_prompt: str | None = None,
        steps: int = 4,
        guidance: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        init_image: Image.Image | None = None,
        strength: float = 0.5,
        tcd_gamma: float | None = None,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """Image i uses a generator seeded seed + i: the same seed gives the same image in any batch.
        `should_stop`, checked after every denoising step, aborts the call with Superseded (lcmkit serve).
        `tcd_gamma` (TCDScheduler only) defaults to the generator's."""

        from lcmkit.errors import ConfigError

        if steps < 1:
            raise ConfigError(f"--steps {steps}: must be >= 1")
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"--strength {strength}: must be between 0 and 1")
        if init_image is not None and int(steps * strength) < 1:
            raise ConfigError(f"--steps {steps} x --strength {strength} leaves no denoising step: raise either")
        self.check_size(width, height)
        guidance = self.default_guidance if guidance is None else guidance
        if guidance < 0:
            raise ConfigError(f"--guidance {guidance}: must be >= 0")
        tcd_gamma = self.tcd_gamma if tcd_gamma is None else tcd_gamma
        check_tcd_gamma(tcd_gamma)
        if negative_prompt and self.full:
            raise ConfigError("a full LCM takes no negative prompt (guidance is its input); drop --negative-prompt")
        pipe = self.pipe
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance}
        if negative_prompt:
            kwargs["negative_prompt"] = negative_prompt
        if self.scheduler_name == "tcd":
            kwargs["eta"] = tcd_gamma
        if self.scheduler_name == "euler":  # a flow student's deterministic steps, on its training grid
            kwargs["sigmas"] = grid_sigmas(steps, self.num_ddim_timesteps)
        if init_image is not None:
            if self._img2img is None:
                from diffusers import AutoPipelineForImage2Image

                self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
                self._img2img.set_progress_bar_config(disable=True)
            pipe = self._img2img
            kwargs.update(image=init_image.convert("RGB"), strength=strength)
        else:
            kwargs.update(width=width, height=height)
        return run_batched(pipe, prompts, seed, batch_size, progress, **kwargs, **_stop_callback(should_stop))

    @property
    def has_teacher(self) -> bool:
        """The base model without the LoRAs is the teacher (not available for a full LCM)."""
        return not self.full and bool(self.adapters)

    def teacher(
        self,
        prompts: list[str],
        steps: int = 25,
        guidance: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        sampler: str = "dpm++",
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """The same prompts from the teacher (the base, adapters off) with its usual sampler and guidance (default:
        its family's guidance scale)."""
        from lcmkit.errors import ConfigError

        if not self.has_teacher:
            raise ConfigError("the teacher comparison needs --base with an LCM-LoRA (a full LCM has no teacher here)")
        pipe, lcm_scheduler = self.pipe, self.pipe.scheduler
        pipe.scheduler = teacher_scheduler(lcm_scheduler.config, sampler)
        pipe.disable_lora()
        try:
            guidance = self.family_spec.teacher_guidance if guidance is None else guidance
            return run_batched(pipe, prompts, seed, 1, num_inference_steps=steps, guidance_scale=guidance,
                               width=width, height=height, **_stop_callback(should_stop))  # fmt: skip
        finally:
            pipe.enable_lora()
            pipe.scheduler = lcm_scheduler


class Superseded(Exception):
    """A newer request made this generation stale (lcmkit serve)."""


def _stop_callback(should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    if should_stop is None:
        return {}

    def check(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if should_stop():
            raise Superseded
        return tensors

    return {"callback_on_step_end": check}


def distilled_pipeline(
    teacher: str, lora: str | None, lcm: str | None, teacher_config: str | None, device: str, dtype: str,
    guidance: float, lcm_guidance: float | None = None, compile: bool = False,
) -> tuple[Any, str, float]:  # fmt: skip
    """(LCMScheduler pipeline, "LCM-LoRA" or "LCM", its guidance) for evaluations and benchmarks.

    An LCM-LoRA is fused into the teacher UNet and unloaded (a deployed model's speed) and runs at guidance 1;
    a full LCM takes `guidance` as its w input. `lcm_guidance` overrides either."""
    gen = FewStepGenerator(None if lcm else teacher, [(lora, 1.0)] if lora else [], lcm, "lcm", device, dtype,
                           teacher_config, compile=compile)  # fmt: skip
    if lora and not compile:  # compile fuses them itself
        gen.pipe.fuse_lora()
        gen.pipe.unload_lora_weights()
    # a full UNet LCM takes the teacher's guidance as its w input; otherwise the model's own default (1: no CFG
    # pass; a guidance-distilled model's guidance input)
    full_unet = gen.full and not gen.family_spec.flow
    w = lcm_guidance if lcm_guidance is not None else (guidance if full_unet else gen.default_guidance)
    return gen.pipe, "LCM" if gen.full else "LCM-LoRA", w


def plain_diffusers_pipeline(teacher: str, lora: str | None, lcm: str | None, device: str, dtype: Any) -> Any:
    """The same weights loaded the way diffusers' LCM docs do it, for side-by-side benchmarks: the pipeline
    class from_pretrained, LCMScheduler, and an LCM-LoRA through load_lora_weights + fuse_lora."""
    from diffusers import DiffusionPipeline, FlowMatchLCMScheduler, LCMScheduler

    from lcmkit.infer.schedulers import is_flow

    folder = Path(lcm) / "pipeline" if lcm and (Path(lcm) / "pipeline").is_dir() else lcm
    pipe = DiffusionPipeline.from_pretrained(folder or teacher, **dtype_kwarg(dtype))
    if is_flow(pipe.scheduler.config):  # SD3/FLUX: FlowMatchLCMScheduler with the teacher's shift
        pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    else:  # an LCM-LoRA on the grid it was distilled on, as its model card says (a full LCM's config holds its own)
        grid = {"original_inference_steps": lcm_lora_ddim_timesteps([(lora, 1.0)])} if lora else {}
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **grid)
    if lora:
        file = lora_file(lora)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
