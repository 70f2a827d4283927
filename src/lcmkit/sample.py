"""Few-step generation with an LCM UNet or an LCM-LoRA, through diffusers' pipelines and LCMScheduler."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from .models import PRECISIONS, Teacher, dtype_kwarg, pipeline_class

SAMPLERS = ("ddim", "dpm++")
LCM_SAMPLERS = ("lcm", "tcd")


def teacher_scheduler(config: Any, sampler: str) -> Any:
    """The teacher's noise schedule under DDIM or DPM-Solver++ (2nd order multistep)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":  # DDIM's default clip_sample=True would clip latents to [-1, 1]: SD configs set False
        return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    from .config import ConfigError

    raise ConfigError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def few_step_scheduler(config: Any, sampler: str) -> Any:
    """A distilled model's sampler over `config`'s noise schedule: LCMScheduler (the LCM paper's multistep
    consistency sampling), or TCDScheduler (Zheng et al. 2024's strategic stochastic sampling: each step goes
    back to an intermediate time set by gamma, passed to the pipeline as eta; gamma 1 is LCM's sampling)."""
    from diffusers import LCMScheduler, TCDScheduler

    if sampler not in LCM_SAMPLERS:
        from .config import ConfigError

        raise ConfigError(f"sampler {sampler!r}: choose one of {', '.join(LCM_SAMPLERS)}")
    return (LCMScheduler if sampler == "lcm" else TCDScheduler).from_config(config)


def with_sampler(pipe: Any, sampler: str) -> Any:
    """A pipeline sharing `pipe`'s models, on the distilled-model `sampler` (see few_step_scheduler)."""
    twin = type(pipe).from_pipe(pipe, scheduler=few_step_scheduler(pipe.scheduler.config, sampler))
    twin.set_progress_bar_config(disable=True)
    return twin


def check_tcd_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        from .config import ConfigError

        raise ConfigError(f"--tcd-gamma {gamma}: must be between 0 and 1 (0.3 is TCD's default)")


def teacher_pipeline(teacher: Teacher, unet: torch.nn.Module, scheduler: Any) -> Any:
    """A StableDiffusion(XL)Pipeline over the teacher's components with `unet` and `scheduler`."""
    parts: dict[str, Any] = dict(
        vae=teacher.vae, text_encoder=teacher.text_encoders[0], tokenizer=teacher.tokenizers[0],
        unet=unet, scheduler=scheduler,
    )  # fmt: skip
    if teacher.family == "sdxl":
        parts.update(text_encoder_2=teacher.text_encoders[1], tokenizer_2=teacher.tokenizers[1])
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(teacher.family)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_pipeline(teacher: Teacher, unet: torch.nn.Module, num_ddim_timesteps: int = 50) -> Any:
    """The teacher's pipeline with `unet` and LCMScheduler.

    A full LCM UNet (time_cond_proj_dim set) takes guidance_scale as its w input (no CFG pass);
    an LCM-LoRA UNet is run with guidance_scale 1 (no CFG either)."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=num_ddim_timesteps)
    return teacher_pipeline(teacher, unet, scheduler)


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
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        if negative:
            kwargs["negative_prompt"] = [negative] * len(chunk)
        if latents is not None:
            given = latents[start : start + len(chunk)]
            for g in generators:
                torch.randn((1, *given.shape[1:]), generator=g)
            kwargs["latents"] = given.to(pipe.device, pipe.unet.dtype)
        images += pipe(chunk, generator=generators, output_type="pil", **kwargs).images
    return images


def initial_noise(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(n, *shape) standard normal latents, image i drawn from a CPU generator seeded seed + i: the noise
    diffusers' pipelines draw for image i with run_batched's generators, made explicit so that every
    sampler of an evaluation starts image i from the very same tensor."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(n)]
    )


def default_size(pipe: Any) -> int:
    """The pipeline's native square size in pixels (UNet sample_size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(
    pipe: Any, prompts: list[str], steps: int, guidance_scale: float, seed: int, size: int, batch_size: int = 16
) -> list[Image.Image]:
    """Square images of `size` at `steps` steps (validation grids, the demo)."""
    return run_batched(
        pipe, prompts, seed, batch_size, num_inference_steps=steps, guidance_scale=guidance_scale, height=size,
        width=size,
    )  # fmt: skip


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """A labelled grid: one row per prompt, one column per setting."""
    w, h = rows[0][0].size
    cell = max(w, 112)
    left, top = 8, 16
    grid = Image.new("RGB", (left + cell * len(col_labels), top + (cell + 12) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((left + j * cell + 2, 2), label, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (cell + 12)
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left + j * cell, y))
        draw.text((left, y + cell), label[: cell * len(col_labels) // 6], fill="black")
    return grid


# -- generation from a distilled model (`lcmkit generate` and the Python API) ------------------------


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    return PRECISIONS[dtype]


def lora_target_modules(path: str | Path, family: str = "sd") -> dict[str, tuple[int, ...]]:
    """UNet module name -> shape of its LoRA down (A) weight, read from a diffusers/peft LoRA file, or from a
    kohya/webui file through diffusers' own converter (the one load_lora_weights uses)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if any(k.startswith(("lora_unet_", "lora_te")) for k in shapes):
        try:
            state, _ = pipeline_class(family).lora_state_dict(str(path))
        except Exception:  # not a LoRA diffusers can read: reported as matching nothing
            state = {}
        # its attention keys come in the old attention-processor naming: attn1.processor.to_k_lora.down.weight
        processor = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
        shapes = {
            processor.sub(lambda m: f".{m[1]}{'.0' * (m[1] == 'to_out')}.lora.{m[2]}.weight", key): tuple(value.shape)
            for key, value in state.items()
        }
    targets: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        for marker in (".lora_A.weight", ".lora.down.weight", ".lora_A.default.weight"):
            if key.endswith(marker) and not key.startswith("text_encoder"):
                name = key[: -len(marker)]
                targets[name.removeprefix("unet.").removeprefix("base_model.model.")] = shape
    return targets


def check_lora_matches(unet: torch.nn.Module, path: str | Path, family: str) -> None:
    """Refuse a LoRA that matches no UNet module, or one made for another base (shapes differ)."""
    from .config import ConfigError

    targets = lora_target_modules(path, family)
    if not targets:
        raise ConfigError(f"LoRA {path} has no UNet LoRA weights (diffusers/peft lora_A or kohya lora_unet_ keys)")
    modules = dict(unet.named_modules())
    matched = [n for n in targets if n in modules]
    if not matched:
        example = next(iter(targets))
        raise ConfigError(f"LoRA {path} matches no module of this {family.upper()} UNet (e.g. {example}): "
                          "it was made for another model")  # fmt: skip
    for name in matched:
        layer = modules[name]
        fan_in = layer.in_channels if hasattr(layer, "in_channels") else getattr(layer, "in_features", None)
        if fan_in is not None and targets[name][1] != fan_in:
            raise ConfigError(f"LoRA {path} does not fit this {family.upper()} base ({name} expects {fan_in} inputs, "
                              f"the LoRA has {targets[name][1]}): it was made for another family")  # fmt: skip


def lora_file(path: str | Path, allow_pickle: bool = False) -> Path:
    """The checked .safetensors file of a LoRA file or folder (a pickle one, when allowed, converted)."""
    from .config import ConfigError
    from .safe_load import weights_file

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "pytorch_lora_weights.safetensors"
    if not p.is_file():
        raise ConfigError(f"LoRA {path} does not exist (give a .safetensors file or a folder holding "
                          "pytorch_lora_weights.safetensors)")  # fmt: skip
    return weights_file(p, "LoRA", allow_pickle)


def lcm_lora_ddim_timesteps(loras: list[tuple[str, float]], default: int = 50) -> int:
    """N, the DDIM skipping grid an lcmkit LCM-LoRA among `loras` was distilled on (its run record beside the
    weights), else `default`. Its consistency function is trained at those N timesteps only, so LCMScheduler and
    TCDScheduler must draw their steps from the same grid (original_inference_steps = N)."""
    import json

    for path, _ in loras:
        p = Path(path).expanduser()
        record = (p if p.is_dir() else p.parent) / "lcmkit_run.json"
        try:
            run = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(run, dict) or run.get("mode") != "lora":
            continue
        n = run.get("config", {}).get("lcd", {}).get("num_ddim_timesteps")
        if isinstance(n, int) and n >= 1:
            return n
    return default


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'path[:weight]' -> (path, weight); a Windows drive letter or a path with ':' stays whole."""
    from .config import ConfigError

    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(weight)
        except ValueError:
            raise ConfigError(f"--lora {spec}: the weight after ':' must be a number") from None
    return spec, 1.0


class SubpixelUpsample(torch.nn.Module):
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution) computed on the low-resolution input: each of
    the four output phases (row and column parity) sees a 2x2 window of input pixels, so the 3x3 kernel folds into
    four 2x2 kernels. 16 instead of 36 multiply-adds per input pixel and channel pair, no 4x-sized intermediate;
    the same output up to float rounding (tests/test_generate.py)."""

    def __init__(self, upsample: torch.nn.Module):
        super().__init__()
        self.conv = upsample.conv  # the same state-dict keys as Upsample2D: save_pretrained writes a loadable VAE
        object.__setattr__(self, "fallback", upsample)  # not a submodule: its conv would be saved twice
        w = upsample.conv.weight.detach()
        rows = (  # phase 0 reads source rows (i-1, i), phase 1 rows (i, i+1)
            torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2),
        )
        kernels = [
            torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1)
            if b == 0
            else torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1)
            for r in rows
            for b in (0, 1)
        ]
        self.register_buffer("kernels", torch.stack(kernels), persistent=False)

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        conv = getattr(module, "conv", None)
        return (
            type(module).__name__ == "Upsample2D" and module.use_conv and not module.use_conv_transpose
            and module.interpolate and module.norm is None and isinstance(conv, torch.nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        n, _, h, w = hidden_states.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.fallback(hidden_states, output_size, *args, **kwargs)
        x = torch.nn.functional.pad(hidden_states, (1, 1, 1, 1))
        bias = self.conv.bias
        phases = [
            torch.nn.functional.conv2d(x[:, :, a : a + h + 1, b : b + w + 1], self.kernels[2 * a + b], bias)
            for a in (0, 1)
            for b in (0, 1)
        ]
        out = torch.stack(phases, 2).view(n, -1, 2, 2, h, w)  # (n, c, row phase, column phase, h, w)
        return out.permute(0, 1, 4, 2, 5, 3).reshape(n, -1, 2 * h, 2 * w)


def subpixel_vae_decoder(vae: torch.nn.Module) -> int:
    """Swap the VAE decoder's upsamplers for SubpixelUpsample; returns how many. The decoder's weights are frozen
    from here on (generation only)."""
    count = 0
    for block in vae.decoder.up_blocks:
        for i, up in enumerate(block.upsamplers or []):
            if SubpixelUpsample.applies_to(up):
                block.upsamplers[i] = SubpixelUpsample(up)
                count += 1
    return count


def compile_for_inference(pipe: Any) -> None:
    """torch.compile (inductor) the UNet and the VAE decoder in place. On a CPU with inductor's freezing the
    weights become constants, convolutions get oneDNN's prepacked layouts and elementwise ops fuse: 1.32x per
    full-size SD1.5 UNet call at 256 px on a 2-core CPU (2.33 -> 1.76 s), outputs equal within 1e-5. The first
    call compiles (minutes on a CPU); a new batch size or resolution compiles again."""
    options = {"freezing": pipe.device.type == "cpu"}  # for these modules only: training must never freeze
    pipe.unet.compile(options=options)
    pipe.vae.decoder.compile(options=options)


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
        tcd_gamma: float = 0.3,
    ):
        from .config import ConfigError, ModelConfig
        from .models import load_teacher

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
            self.pipe, self.family = self._load_full(lcm, base_config, allow_pickle)
        else:
            teacher = load_teacher(ModelConfig(teacher=base, teacher_config=base_config, allow_pickle=allow_pickle))
            self.family = teacher.family
            n = num_ddim_timesteps or lcm_lora_ddim_timesteps(loras)
            self.pipe = lcm_pipeline(teacher, teacher.unet, n)
        self.adapters: list[tuple[str, float]] = []
        for i, (path, weight) in enumerate(loras):
            file = lora_file(path, allow_pickle)
            check_lora_matches(self.pipe.unet, file, self.family)
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
    def _load_full(lcm: str, config: str | None = None, allow_pickle: bool = False) -> tuple[Any, str]:
        """A full LCM: a distill output folder, its pipeline/ folder, or a single .safetensors file written by
        `lcmkit export single-file` (with `config`, a diffusers folder or hub id holding the configs)."""
        from diffusers import DiffusionPipeline

        from .config import ConfigError
        from .safe_load import check_weights_folder, weights_file

        folder = Path(lcm).expanduser()
        if folder.is_file():
            folder = weights_file(folder, "--lcm", allow_pickle)
            if not config:
                raise ConfigError(f"--lcm {lcm} is a single file: pass --base-config (a diffusers folder or hub id "
                                  "of the same architecture) for its configs")  # fmt: skip
            from .single_file import import_single_file

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
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is None:
            raise ConfigError(f"--lcm {lcm}: its UNet has no guidance input (time_cond_proj_dim): not a full LCM")
        family = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"
        # One code path: the plain SD/SDXL pipelines feed guidance_scale - 1 to timestep_cond and run no CFG
        # for such a UNet, and (unlike LatentConsistencyModelPipeline) pass TCD's gamma to the scheduler.
        return pipeline_class(family).from_pipe(pipe), family

    def set_scheduler(self, name: str) -> None:
        self.pipe.scheduler = few_step_scheduler(self.pipe.scheduler.config, name)
        self.scheduler_name = name

    @property
    def default_guidance(self) -> float:
        """Full LCM: the w input (diffusers' default 8.5); LCM-LoRA: 1 (no classifier-free guidance)."""
        return 8.5 if self.full else 1.0

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

        from .config import ConfigError

        if steps < 1:
            raise ConfigError(f"--steps {steps}: must be >= 1")
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"--strength {strength}: must be between 0 and 1")
        if init_image is not None and int(steps * strength) < 1:
            raise ConfigError(f"--steps {steps} x --strength {strength} leaves no denoising step: raise either")
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
        guidance: float = 7.5,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        sampler: str = "dpm++",
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """The same prompts from the teacher (the base, adapters off) with its usual sampler and guidance."""
        from .config import ConfigError

        if not self.has_teacher:
            raise ConfigError("the teacher comparison needs --base with an LCM-LoRA (a full LCM has no teacher here)")
        pipe, lcm_scheduler = self.pipe, self.pipe.scheduler
        pipe.scheduler = teacher_scheduler(lcm_scheduler.config, sampler)
        pipe.disable_lora()
        try:
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
    w = lcm_guidance if lcm_guidance is not None else (guidance if gen.full else 1.0)
    return gen.pipe, "LCM" if gen.full else "LCM-LoRA", w


def plain_diffusers_pipeline(teacher: str, lora: str | None, lcm: str | None, device: str, dtype: Any) -> Any:
    """The same weights loaded the way diffusers' LCM docs do it, for side-by-side benchmarks: the pipeline
    class from_pretrained, LCMScheduler, and an LCM-LoRA through load_lora_weights + fuse_lora."""
    from diffusers import DiffusionPipeline, LCMScheduler

    folder = Path(lcm) / "pipeline" if lcm and (Path(lcm) / "pipeline").is_dir() else lcm
    pipe = DiffusionPipeline.from_pretrained(folder or teacher, **dtype_kwarg(dtype))
    # an LCM-LoRA on the grid it was distilled on, as its model card says (a full LCM's config holds its own)
    grid = {"original_inference_steps": lcm_lora_ddim_timesteps([(lora, 1.0)])} if lora else {}
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **grid)
    if lora:
        file = lora_file(lora)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png_parameters(prompt: str, seed: int, info: dict[str, Any]) -> Any:
    """PNG text chunks: an AUTOMATIC1111-style 'parameters' line and the full JSON record."""
    import json

    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    neg = f"\nNegative prompt: {info['negative_prompt']}" if info.get("negative_prompt") else ""
    line = (f"{prompt}{neg}\nSteps: {info['steps']}, Sampler: {info['scheduler'].upper()}, "
            f"CFG scale: {info['guidance']}, Seed: {seed}, Model: {info.get('model', '')}")  # fmt: skip
    meta.add_text("parameters", line)
    meta.add_text("lcmkit", json.dumps({"prompt": prompt, "seed": seed, **info}))
    return meta


def save_images(
    images: list[Image.Image], prompts: list[str], out: str | Path, seed: int, info: dict[str, Any], overwrite: bool
) -> Path:
    """NNNN-seedS.png files with their generation parameters in PNG text chunks; never overwrites silently."""
    from .config import ConfigError

    folder = Path(out)
    paths = [folder / f"{i:04d}-seed{seed + i}.png" for i in range(len(images))]
    clash = next((p for p in paths if p.exists()), None)
    if clash is not None and not overwrite:
        raise ConfigError(f"{clash} exists: pass --overwrite or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, prompt, image) in enumerate(zip(paths, prompts, images)):
        image.save(path, pnginfo=png_parameters(prompt, seed + i, info))
    return folder
