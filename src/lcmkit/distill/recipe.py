"""`lcmkit distill`: wire config, teacher, models, data and the trainer together, then save outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from lcmkit.data import ImageTransform, SampleStream, SkipTally, Source, make_dataloader, resolve_data, summarize_skips
from lcmkit.distill.config import DistillConfig, validate
from lcmkit.distill.validation import Validator
from lcmkit.errors import ConfigError
from lcmkit.families.teacher import Teacher, load_teacher
from lcmkit.families.unet import LCDModels, build_lcd_models, save_full_lcm, save_lora
from lcmkit.measure.system import peak_rss_mb, versions
from lcmkit.methods.lcd import LCDSettings, lcd_loss
from lcmkit.runtime import PRECISIONS
from lcmkit.train.checkpoint import CHECKPOINT_DIR, GeneratorState, find_checkpoint
from lcmkit.train.lock import RunLock
from lcmkit.train.loop import Trainer, TrainerSettings, TrainResult
from lcmkit.train.optim import make_optimizer
from lcmkit.train.session import accelerator_session, on_main

log = logging.getLogger(__name__)


RUN_RECORD = "lcmkit_run.json"


OUTPUTS = (RUN_RECORD, "README.md", "pytorch_lora_weights.safetensors", "unet", "unet_online", "pipeline", "validation",
           "logs", CHECKPOINT_DIR)  # fmt: skip


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision


@dataclass
class DistillResult:
    out: Path
    mode: str
    family: str
    train: TrainResult
    peak_rss_mb: float
    main_process: bool = True


def prepare_out_dir(cfg: DistillConfig) -> Path:
    """Refuse to clobber a finished or unfinished run unless asked (nothing is removed here)."""
    out = Path(cfg.train.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if (out / "model_index.json").exists() or Path(cfg.model.teacher).expanduser().resolve() == out.resolve():
        raise ConfigError(f"--out {out} is a pipeline folder (the teacher?): choose a new folder")
    finished = (out / RUN_RECORD).is_file()
    has_checkpoint = (out / CHECKPOINT_DIR / "latest").is_file()
    if finished and not (cfg.train.resume or cfg.train.overwrite):
        raise ConfigError(f"--out {out} already holds a finished run: pass --overwrite to replace it, "
                          "--resume latest to continue it, or choose another folder")  # fmt: skip
    if has_checkpoint and not (cfg.train.resume or cfg.train.overwrite or finished):
        raise ConfigError(f"--out {out} holds an unfinished run: pass --resume latest to continue it "
                          "or --overwrite to start over")  # fmt: skip
    if cfg.train.resume and cfg.train.resume != "latest":
        try:
            find_checkpoint(out, cfg.train.resume)
        except FileNotFoundError as e:
            raise ConfigError(f"--resume {cfg.train.resume}: {e}") from None
    return out


def clear_outputs(out: Path) -> None:
    """--overwrite: remove lcmkit's own files from --out (and nothing else)."""
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def distill(cfg: DistillConfig, command: str = "") -> DistillResult:
    """Run LCD end to end. Raises ConfigError on bad input before any heavy work."""
    validate(cfg)
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU: use bf16 or no on this machine")
    if cfg.train.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to tensorboard needs tensorboard: pip install tensorboard") from None
    if cfg.optim.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes (CUDA)") from None
    source = resolve_data(cfg.data.data, cfg.data.image_column, cfg.data.caption_column)
    out = prepare_out_dir(cfg)
    t_start = time.perf_counter()
    if cfg.preset:  # before loading anything: the preset may name a VAE for another family
        from lcmkit.families.teacher import detect_family

        family = cfg.model.family or detect_family(cfg.model.teacher, cfg.model.revision)
        check_preset_family(cfg.preset, family, cfg.model.teacher)
    with (
        accelerator_session(
            mixed_precision=cfg.train.mixed_precision,
            log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
            project_dir=str(out / "logs"),
        ) as accelerator,
        run_lock(out, accelerator, command),
    ):
        teacher = load_teacher(cfg.model)
        check_cache(source, teacher, cfg.data.resolution)
        if cfg.train.overwrite:  # only once the teacher loaded: a typo must not cost the previous run
            on_main(accelerator, lambda: clear_outputs(out))
        accelerator.wait_for_everyone()
        positions = cfg.train.batch_size * (cfg.data.resolution // vae_downsampling(teacher)) ** 2
        with conv_kernels(cfg.train.cpu_conv, teacher.unet, accelerator.device, positions):
            return _run(cfg, teacher, source, out, accelerator, command, t_start)


SMALL_UNET_PARAMS = 50_000_000


SMALL_CONV_POSITIONS = 2048
"""Latent positions per UNet call (batch x latent height x width) below which oneDNN's per-call setup outweighs
the work: a tiny SD at 64 px, batch 4 (256 positions) steps ~25% faster on native kernels; the toy teacher at
32 px, batch 32 (8,192 positions) 1.47x faster on oneDNN (2.63 against 3.88 s per LoRA step, one run)."""


def vae_downsampling(teacher: Any) -> int:
    blocks = getattr(getattr(teacher.vae, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


@contextmanager
def conv_kernels(choice: str, unet: torch.nn.Module, device: torch.device, positions: int = 0) -> Iterator[None]:
    """CPU convolution kernels for the run: ATen's native ones or oneDNN's. `auto` picks native for small work
    only: a UNet below SMALL_UNET_PARAMS parameters called on at most SMALL_CONV_POSITIONS latent positions."""
    if device.type != "cpu":
        yield
        return
    small = sum(p.numel() for p in unet.parameters()) < SMALL_UNET_PARAMS and positions <= SMALL_CONV_POSITIONS
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = not (choice == "native" or (choice == "auto" and small))
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@contextmanager
def run_lock(out: Path, accelerator: Any, command: str) -> Iterator[None]:
    """One run per --out (the main process holds the lock); other processes of this run only log errors."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        if os.environ.get("RANK", "0") != "0":
            from lcmkit.train.session import PeerFailed

            raise PeerFailed("not the first process")
        raise ConfigError(f"started as one of {world} processes, but accelerate set up no process group: on a "
                          "CPU-only machine launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                          f"--num_processes {world} -m lcmkit distill ...")  # fmt: skip
    lock = RunLock(out, command)
    package_log = logging.getLogger("lcmkit")
    level = package_log.level
    if not accelerator.is_main_process:  # warnings once, from the main process
        package_log.setLevel(logging.ERROR)
    on_main(accelerator, lock.acquire)
    try:
        yield
    finally:
        if accelerator.is_main_process:
            lock.release()
        package_log.setLevel(level)


def check_preset_family(preset: str | None, family: str, teacher: str) -> None:
    from lcmkit.distill.config import list_presets

    if not preset:
        return
    meant = list_presets()[preset].get("family")
    if meant and meant != family:
        names = ", ".join(n for n, p in list_presets().items() if p.get("family") == family)
        raise ConfigError(f"--preset {preset} is for {meant.upper()} teachers, but {teacher} is {family.upper()}: "
                          f"use one of {names}")  # fmt: skip


def check_cache(source: Source, teacher: Teacher, resolution: int) -> None:
    """A cache must come from this teacher's VAE and text encoder(s), at this resolution."""
    from lcmkit.data.cache import CacheSource, encoder_fingerprint

    if isinstance(source, CacheSource):
        source.check_matches(teacher.family, encoder_fingerprint(teacher.vae, teacher.text_encoders), resolution)


def release_for_cache(source: Source, teacher: Teacher, conditioner: Any, cfg: DistillConfig) -> list[str]:
    """LoRA training from a cache encodes nothing: free the VAE encoder and (unless validation needs them to
    encode its prompts) the text encoders. (A full run keeps them: its pipeline/ output holds them.)
    Returns what was released."""
    import gc

    from lcmkit.data.cache import CacheSource

    if not isinstance(source, CacheSource):
        return []
    released = ["vae.encoder"]
    teacher.vae.encoder = None
    if getattr(teacher.vae, "quant_conv", None) is not None:
        teacher.vae.quant_conv = None
    if not cfg.train.validation_prompts:
        conditioner.release_encoders()
        teacher.text_encoders = []
        released.append("text_encoders")
    gc.collect()
    return released


def _run(
    cfg: DistillConfig,
    teacher: Teacher,
    source: Source,
    out: Path,
    accelerator: Any,
    command: str,
    t_start: float,
) -> DistillResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    if cfg.train.report_to != "none":
        accelerator.init_trackers("lcmkit", config=_flat_config(cfg))
    set_seed(cfg.train.seed)
    device = accelerator.device

    frozen_dtype = DTYPES[cfg.train.mixed_precision]
    teacher_storage = PRECISIONS.get(cfg.train.teacher_precision)
    channels_last = cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    models = build_lcd_models(teacher, cfg.mode, cfg.lcd, cfg.lora, frozen_dtype, device, teacher_storage, layout)
    for module in (models.student_unet, models.teacher_unet, models.target_unet, teacher.vae, *teacher.text_encoders):
        if module is not None:
            module.to(device)
    if cfg.train.attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        for unet in {models.student_unet, models.teacher_unet}:
            unet.set_attn_processor(AttnProcessor())
    if cfg.train.gradient_checkpointing:
        models.student_unet.enable_gradient_checkpointing()
    if cfg.train.compile:  # in place: parameter names, checkpoints and saved weights stay as they are
        for unet in (models.student_unet, models.teacher_unet, models.target_unet):
            if unet is not None:  # never inductor's freezing: it bakes the weights in, and these change every step
                unet.compile(options={"freezing": False})

    optimizer = make_optimizer(models.trainable_parameters(), cfg)
    lr_scheduler = get_scheduler(
        cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )  # fmt: skip
    student_wrapped, optimizer = accelerator.prepare(models.student_unet, optimizer)

    d = cfg.data
    dataset = SampleStream(
        source, ImageTransform(d.resolution, d.center_crop, d.random_flip, d.min_size, d.max_aspect),
        seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer, rank=accelerator.process_index,
        world_size=accelerator.num_processes, caption_dropout=d.caption_dropout,
    )  # fmt: skip
    dataloader = make_dataloader(dataset, cfg.train.batch_size, cfg.data.num_workers)

    conditioner = teacher.conditioner()
    released = release_for_cache(source, teacher, conditioner, cfg) if cfg.mode == "lora" else []
    uncond_mode = teacher.default_uncond() if cfg.lcd.uncond == "auto" else cfg.lcd.uncond
    schedule = teacher.noise_schedule()
    settings = LCDSettings(
        prediction_type=teacher.prediction_type, num_ddim_timesteps=cfg.lcd.num_ddim_timesteps,
        w_min=cfg.lcd.w_min, w_max=cfg.lcd.w_max, loss=cfg.lcd.loss, huber_c=cfg.lcd.huber_c,
        timestep_scaling=cfg.lcd.timestep_scaling, sigma_data=cfg.lcd.sigma_data,
    )  # fmt: skip
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + accelerator.process_index)
    student_fn = models.student_forward(student_wrapped)
    vae, scaling = teacher.vae, teacher.vae_scaling_factor
    size = (cfg.data.resolution, cfg.data.resolution)

    skips = SkipTally()

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        skips.update(batch)
        with torch.no_grad(), record_function("lcd/encode"):
            if "latent_mean" in batch:  # from a cache: draw the latent exactly as latent_dist.sample() does
                mean = batch["latent_mean"].to(device, vae.dtype)
                std = batch["latent_std"].to(device, vae.dtype)
                eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
                z0 = (mean + std * eps) * scaling
                cond = conditioner.from_cache(batch, size)
            else:
                pixels = batch["pixel_values"].to(device, vae.dtype)
                z0 = vae.encode(pixels).latent_dist.sample(generator) * scaling
                cond = conditioner.encode(batch["caption"], batch["original_size"], batch["crop_top_left"], size)
            uncond = conditioner.unconditional(cond, uncond_mode)
            if batch["drop_caption"].any():
                cond = cond.where(batch["drop_caption"], uncond)
        return lcd_loss(z0, cond, uncond, student_fn, models.teacher, models.target, schedule, settings, generator)

    validator = Validator(cfg, teacher, models, out, accelerator) if cfg.train.validation_prompts else None
    trainer = Trainer(
        accelerator,
        TrainerSettings(
            out_dir=out, max_steps=cfg.train.max_steps, batch_size=cfg.train.batch_size,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            max_grad_norm=cfg.optim.max_grad_norm, checkpoint_every=cfg.train.checkpoint_every,
            max_nonfinite_steps=cfg.train.max_nonfinite_steps, profile_steps=cfg.train.profile_steps,
            checkpoints_total_limit=cfg.train.checkpoints_total_limit, log_every=cfg.train.log_every,
            callback_every=cfg.train.validation_every if validator else 0, progress=cfg.train.progress,
            description=f"distill {cfg.mode}",
        ),
        student_wrapped, optimizer, lr_scheduler, dataloader, loss_fn,
        state={**models.checkpoint_state(), "lcd_generator": GeneratorState(generator)},
        on_step_end=models.update_ema if cfg.mode == "full" else None,
        callback=validator,
        meta={"mode": cfg.mode, "teacher": cfg.model.teacher},
    )  # fmt: skip
    if cfg.train.resume:
        try:
            resumed = trainer.resume(cfg.train.resume)
        except (FileNotFoundError, KeyError, ConfigError) as e:
            raise ConfigError(f"--resume {cfg.train.resume}: {e}") from None
        if not resumed:
            log.warning("--resume latest: no checkpoint in %s yet, starting from step 0", out)
    result = trainer.run()
    skipped = _gather_skips(skips.totals(), accelerator)
    if skipped:
        log.warning("data: %s", summarize_skips(skipped))

    accelerator.wait_for_everyone()

    def finish() -> None:
        _save_outputs(cfg, teacher, models, out, accelerator)
        if validator is not None and (not cfg.train.validation_every or result.steps % cfg.train.validation_every):
            validator(result.steps)
        record = {
            "mode": cfg.mode, "family": teacher.family, "prediction_type": teacher.prediction_type,
            "uncond": uncond_mode,
            "command": command, "config": cfg.to_dict(), "versions": versions(),
            "steps": result.steps, "median_s_per_step": result.median_s_per_step,
            "samples_per_s": result.samples_per_s, "final_loss": result.final_loss,
            "nonfinite_steps": result.nonfinite_steps,
            "wall_s": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
            "device": str(device), "num_processes": accelerator.num_processes,
            "data": {"source": source.description, "skipped": skipped, "released": released},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        from lcmkit.measure.system import machine
        from lcmkit.outputs.card import write_model_card

        record["machine"] = machine()
        (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        write_model_card(out, cfg.train.hub_model_id)
        if cfg.train.push_to_hub:
            from lcmkit.outputs.hub import push

            push(out, cfg.train.hub_model_id or out.resolve().name, cfg.train.hub_private)

    on_main(accelerator, finish)
    return DistillResult(out, cfg.mode, teacher.family, result, peak_rss_mb(), accelerator.is_main_process)


def _gather_skips(counts: dict[str, int], accelerator: Any) -> dict[str, int]:
    if accelerator.num_processes == 1:
        return counts
    from accelerate.utils import gather_object

    total: dict[str, int] = {}
    for part in gather_object([counts]):
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total


def _save_outputs(cfg: DistillConfig, teacher: Teacher, models: LCDModels, out: Path, accelerator: Any) -> None:
    if cfg.mode == "lora":
        save_lora(accelerator.unwrap_model(models.student_unet), teacher.family, out, cfg.lora)
        return
    # The EMA target is the exported LCM (`unet/`, `pipeline/`); the online student is kept beside it.
    save_full_lcm(models.target_unet, teacher, out, cfg.lcd.num_ddim_timesteps)
    accelerator.unwrap_model(models.student_unet).save_pretrained(out / "unet_online")


def _flat_config(cfg: DistillConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {"mode": cfg.mode}
    for values in asdict(cfg).values():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[k] = ",".join(map(str, v)) if isinstance(v, list) else v
    return {k: v for k, v in flat.items() if v is not None}
