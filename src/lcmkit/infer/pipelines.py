"""diffusers pipelines over a teacher's components, and seeded batched generation through them."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from lcmkit.families import family_of_pipeline
from lcmkit.families.teacher import Teacher
from lcmkit.infer.sampling import flow_sigmas


def teacher_pipeline(teacher: Teacher, denoiser: torch.nn.Module, scheduler: Any) -> Any:
    """The family's pipeline (e.g. StableDiffusionPipeline) over the teacher's components with `denoiser` (its UNet
    or transformer) and `scheduler`."""
    family = teacher.family
    pipe = family.pipeline_class()(
        vae=teacher.vae, scheduler=scheduler, **{family.denoiser: denoiser},
        **family.components(teacher.text_encoders, teacher.tokenizers), **family.pipeline_kwargs,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_pipeline(teacher: Teacher, denoiser: torch.nn.Module, num_ddim_timesteps: int) -> Any:
    """The teacher's pipeline with `denoiser` and LCMScheduler on the distilled grid (a flow teacher:
    FlowMatchLCMScheduler with the teacher's shift).

    A full LCM UNet (time_cond_proj_dim set) takes guidance_scale as its w input (no CFG pass);
    an LCM-LoRA UNet is run with guidance_scale 1 (no CFG either)."""
    from diffusers import FlowMatchLCMScheduler, LCMScheduler

    if teacher.family.flow:
        return teacher_pipeline(teacher, denoiser, FlowMatchLCMScheduler.from_config(teacher.scheduler.config))
    scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=num_ddim_timesteps)
    return teacher_pipeline(teacher, denoiser, scheduler)


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """A pipeline's UNet or transformer."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser)


@torch.no_grad()
def run_batched(
    pipe: Any,
    prompts: list[str],
    seed: int,
    batch_size: int,
    progress: bool = False,
    latents: torch.Tensor | None = None,
    **kwargs: Any,
) -> list[Image.Image]:
    """Image i gets its own generator seeded seed + i, so an image does not depend on its batch.

    `latents` (n, C, h, w), when given, are the initial noise of the n images (see `initial_noise`). Each
    generator then first skips the draw that the pipeline would have made for them, so that the noise a
    sampler draws later (LCM's re-noising between steps) is what the pipeline draws without `latents`,
    and not a second copy of the initial noise."""
    from tqdm.auto import tqdm

    images: list[Image.Image] = []
    negative = kwargs.pop("negative_prompt", None)
    # FlowMatchLCMScheduler re-noises from torch's global generator (SD3/FLUX pipelines pass it none): seeded
    # per batch, so a flow model's few-step image depends on its batch, unless batch_size is 1.
    global_noise = type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    flow_grid = global_noise or type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    if flow_grid and "num_inference_steps" in kwargs and "sigmas" not in kwargs:  # not the schedulers' own grids
        kwargs["sigmas"] = flow_sigmas(kwargs["num_inference_steps"])
    kwargs.update(sequence_length(pipe))
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        if negative:
            kwargs["negative_prompt"] = [negative] * len(chunk)
        if latents is not None:
            given = latents[start : start + len(chunk)]
            for g in generators:
                torch.randn((1, *given.shape[1:]), generator=g)
            to_pipeline = family_of_pipeline(pipe).pipeline_latents
            given = to_pipeline(given) if to_pipeline else given
            kwargs["latents"] = given.to(pipe.device, denoiser_of(pipe).dtype)
        if global_noise:
            torch.manual_seed(seed + start)
        images += pipe(chunk, generator=generators, output_type="pil", **kwargs).images
    return images


def sequence_length(pipe: Any) -> dict[str, int]:
    """max_sequence_length for a pipeline whose T5 tokenizer is shorter than the pipeline's default (the toy flow
    teacher's 16 positions): lcmkit's text conditioning uses the same length (families/conditioning.token_lengths)."""
    family = family_of_pipeline(pipe)
    for encoder, fixed in zip(family.text_encoders, family.text_lengths):
        tokenizer = getattr(pipe, encoder.replace("text_encoder", "tokenizer"), None)
        if fixed and tokenizer is not None and tokenizer.model_max_length < fixed:
            return {"max_sequence_length": int(tokenizer.model_max_length)}
    return {}


def initial_noise(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(n, *shape) standard normal latents, image i drawn from a CPU generator seeded seed + i: the noise
    diffusers' pipelines draw for image i with run_batched's generators, made explicit so that every
    sampler of an evaluation starts image i from the very same tensor."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(n)]
    )


def default_size(pipe: Any) -> int:
    """The pipeline's native square size in pixels (the denoiser's sample_size, else the pipeline's default, x VAE
    scale factor)."""
    size = denoiser_of(pipe).config.get("sample_size") or pipe.default_sample_size
    return int(size) * int(pipe.vae_scale_factor)


def generate(
    pipe: Any, prompts: list[str], steps: int, guidance_scale: float, seed: int, size: int, batch_size: int = 16
) -> list[Image.Image]:
    """Square images of `size` at `steps` steps (validation grids, the demo)."""
    return run_batched(
        pipe, prompts, seed, batch_size, num_inference_steps=steps, guidance_scale=guidance_scale, height=size,
        width=size,
    )  # fmt: skip


def compile_for_inference(pipe: Any) -> None:
    """torch.compile (inductor) the UNet and the VAE decoder in place. On a CPU with inductor's freezing the
    weights become constants, convolutions get oneDNN's prepacked layouts and elementwise ops fuse: 1.32x per
    full-size SD1.5 UNet call at 256 px on a 2-core CPU (2.33 -> 1.76 s), outputs equal within 1e-5. The first
    call compiles (minutes on a CPU); a new batch size or resolution compiles again."""
    options = {"freezing": pipe.device.type == "cpu"}  # for these modules only: training must never freeze
    denoiser_of(pipe).compile(options=options)
    pipe.vae.decoder.compile(options=options)




