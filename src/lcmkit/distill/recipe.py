"""`lcmkit distill`, the recipe: family -> networks -> method -> trainer -> outputs, in straight lines.

Each step is one call into the part that owns it: families/ loads the teacher and builds student, teacher and
target (full or LoRA); methods/ holds the loss; train/ runs the loop and checkpoints; outputs/ writes weights,
run record and model card. Refusals happen in checks.py before anything heavy is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lcmkit.data import ImageTransform, SampleStream, SkipTally, Source, make_dataloader, resolve_data, summarize_skips
from lcmkit.distill.checks import check_cache, check_environment, check_family, clear_outputs, prepare_out_dir
from lcmkit.distill.config import DistillConfig, apply_defaults, validate
from lcmkit.distill.setup import (
    DTYPES,
    conv_kernels,
    flat_config,
    memory_layout,
    prepare_models,
    release_for_cache,
    run_lock,
)  # fmt: skip
from lcmkit.distill.validation import Validator
from lcmkit.errors import ConfigError
from lcmkit.families.encode import BatchEncoder
from lcmkit.families.models import build_lcd_models
from lcmkit.families.teacher import Teacher, load_teacher
from lcmkit.measure.system import peak_rss_mb
from lcmkit.methods import METHODS
from lcmkit.methods.base import Batch, Nets
from lcmkit.outputs.record import save_weights, write_run_record
from lcmkit.runtime import PRECISIONS
from lcmkit.train.checkpoint import GeneratorState
from lcmkit.train.loop import Trainer, TrainResult, Update
from lcmkit.train.optim import make_lr_scheduler, make_optimizer
from lcmkit.train.session import accelerator_session, gather_counts, on_main
from lcmkit.train.sharding import is_sharded, reshard, unsharded

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    out: Path
    mode: str
    family: str
    train: TrainResult
    peak_rss_mb: float
    main_process: bool = True


def distill(cfg: DistillConfig, command: str = "", scorers: list[Any] | None = None) -> DistillResult:
    """Run a distillation end to end. Raises ConfigError on bad input before any heavy work. `scorers` (eval's
    Scorer functions) add to --watch-quality's scores, e.g. the toy world's probe metrics."""
    validate(cfg)
    check_family(cfg)  # first: a preset for another family also asks for what this machine may not have
    check_environment(cfg)
    source = resolve_data(cfg.data.data, cfg.data.image_column, cfg.data.caption_column)
    out = prepare_out_dir(cfg)
    t_start = time.perf_counter()
    tracker = None if cfg.train.report_to == "none" else cfg.train.report_to
    with (
        accelerator_session(mixed_precision=cfg.train.mixed_precision, log_with=tracker,
                            project_dir=str(out / "logs")) as accelerator,
        run_lock(out, accelerator, command),
    ):  # fmt: skip
        teacher = load_teacher(cfg.model)
        apply_defaults(cfg, teacher.family)
        check_cache(source, teacher, cfg.data.resolution)
        if cfg.train.overwrite:  # only once the teacher loaded: a typo must not cost the previous run
            on_main(accelerator, lambda: clear_outputs(out))
        accelerator.wait_for_everyone()
        positions = cfg.train.batch_size * (cfg.data.resolution // teacher.vae_downsampling) ** 2
        with conv_kernels(cfg.train.cpu_conv, teacher.denoiser, accelerator.device, positions):
            return _run(cfg, teacher, source, out, accelerator, command, t_start, scorers or [])


def _run(
    cfg: DistillConfig, teacher: Teacher, source: Source, out: Path, accelerator: Any, command: str, t_start: float,
    scorers: list[Any],
) -> DistillResult:  # fmt: skip
    from accelerate.utils import set_seed

    if cfg.train.report_to != "none":
        accelerator.init_trackers("lcmkit", config=flat_config(cfg))
    set_seed(cfg.train.seed)
    device, tr = accelerator.device, cfg.train

    # Family -> networks: student, frozen teacher and target, full or LoRA.
    layout = memory_layout(tr.channels_last, device)
    models = build_lcd_models(teacher, cfg.mode, cfg.lcd, cfg.lora, DTYPES[tr.mixed_precision], device,
                              PRECISIONS.get(tr.teacher_precision), layout)  # fmt: skip
    prepare_models(models, teacher, tr, device)
    optimizer = make_optimizer(models.trainable_parameters(), cfg.optim)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, tr.max_steps)
    student, optimizer = accelerator.prepare(models.student_net, optimizer)
    if is_sharded(accelerator):  # FSDP: the EMA target sharded as the student is (its EMA is per shard); the teacher
        models.target_net = accelerator.prepare(models.target_net)  # accelerate shards one model per call
        models.teacher_net = accelerator.prepare(models.teacher_net)
    nets = Nets(models.student_forward(student), models.teacher, models.target, teacher.trajectory(cfg.data.resolution),
                teacher.family.guidance_distilled)  # fmt: skip

    # Data -> encoded batches (raw images or a cache) -> the method's loss.
    d = cfg.data
    transform = ImageTransform(d.resolution, d.center_crop, d.random_flip, d.min_size, d.max_aspect)
    stream = SampleStream(source, transform, seed=tr.seed, shuffle_buffer=d.shuffle_buffer,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          caption_dropout=d.caption_dropout)  # fmt: skip
    conditioner = teacher.conditioner()
    generator = torch.Generator(device).manual_seed(tr.seed * 1000 + accelerator.process_index)
    encode = BatchEncoder(teacher, conditioner, cfg.lcd.uncond, d.resolution, generator, device)
    method, skips = METHODS[cfg.method](cfg.lcd, getattr(cfg, cfg.method, None)), SkipTally()  # [lcd] + its own

    updates, state = [], {**models.checkpoint_state(), "lcd_generator": GeneratorState(generator)}
    if cfg.adversarial.adversarial_weight > 0:  # the discriminator: a second update of the trainer, in the checkpoint
        method, discriminator_update = adversarial(cfg, method, models, teacher, conditioner, nets, accelerator)
        updates.append(discriminator_update)
        state["discriminator"] = method.discriminator
    # after the discriminator is sized (one teacher call on the empty prompt): a cached LoRA run frees the encoders
    released = release_for_cache(source, teacher, conditioner, cfg) if cfg.mode == "lora" else []

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        skips.update(batch)
        return method.loss(nets, Batch(*encode(batch)), generator)

    # The trainer: the student's update (and the discriminator's), the EMA after each step (full), validation grids,
    # checkpoints.
    validator = Validator(cfg, teacher, models, out, accelerator, scorers) if tr.validation_prompts else None
    updates.insert(0, Update("student", student, optimizer, lr_scheduler, loss_fn, cfg.optim.max_grad_norm))
    trainer = Trainer(accelerator, tr, out, updates, make_dataloader(stream, tr.batch_size, d.num_workers),
                      state=state,
                      on_step_end=ema_update(models, accelerator) if cfg.mode == "full" else None, callback=validator,
                      callback_every=tr.validation_every if validator else 0, description=f"distill {cfg.mode}",
                      meta={"mode": cfg.mode, "teacher": cfg.model.teacher})  # fmt: skip
    resume(trainer, tr.resume, out)
    result = trainer.run()
    skipped = gather_counts(skips.totals(), accelerator)
    if skipped:
        log.warning("data: %s", summarize_skips(skipped))
    accelerator.wait_for_everyone()
    if is_sharded(accelerator):  # every process gathers the shards; the main process writes the full weights
        models = replace(models, student_net=unsharded(models.student_net, accelerator),
                         target_net=unsharded(models.target_net, accelerator))  # fmt: skip

    # Outputs: weights, the last validation grid, the run record, the model card, the upload.
    def finish() -> None:
        save_weights(models, teacher, out, cfg, accelerator.unwrap_model)
        if validator is not None and (not tr.validation_every or result.steps % tr.validation_every):
            validator(result.steps)
        record = {
            "mode": cfg.mode, "family": teacher.family.name, "prediction_type": teacher.prediction_type,
            "uncond": encode.uncond, "command": command, "config": cfg.to_dict(), "steps": result.steps,
            "median_s_per_step": result.median_s_per_step, "samples_per_s": result.samples_per_s,
            "final_loss": result.final_loss, "nonfinite_steps": result.nonfinite_steps, "device": str(device),
            "num_processes": accelerator.num_processes,
            "data": {"source": source.description, "skipped": skipped, "released": released},
            "best": validator.best if validator is not None else None,
        }  # fmt: skip
        write_run_record(out, record, t_start)
        publish(out, tr)

    on_main(accelerator, finish)
    return DistillResult(out, cfg.mode, teacher.family.name, result, peak_rss_mb(), accelerator.is_main_process)


def adversarial(
    cfg: DistillConfig, method: Any, models: Any, teacher: Teacher, conditioner: Any, nets: Nets, accelerator: Any
) -> tuple[Any, Update]:
    """The method with the adversarial term, and the discriminator's update (heads sized by one teacher call)."""
    from lcmkit.families.models import teacher_features
    from lcmkit.methods.adversarial import Adversarial, Discriminator

    family, size = teacher.family, cfg.data.resolution
    if family.feature_modules is None:
        raise ConfigError(f"--adversarial-weight: the adversarial term is not available for {family.label} teachers "
                          "yet (SD, SDXL and SD3 only)")  # fmt: skip
    features = teacher_features(models)
    device = accelerator.device
    latent = size // teacher.vae_downsampling
    z = torch.zeros(1, int(teacher.vae.config.latent_channels), latent, latent, device=device)
    sizes = torch.tensor([[size, size]])
    cond = conditioner.encode([""], sizes, torch.zeros_like(sizes), (size, size)).to(device)
    t = nets.trajectory.grid(cfg.lcd.num_ddim_timesteps, device)[-1:]
    with torch.no_grad():
        channels = [f.shape[1] for f in features(z, t, cond)]
    discriminator = Discriminator(channels).to(device)
    method = Adversarial(method, cfg.adversarial, discriminator, features)
    d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=cfg.adversarial.discriminator_lr)
    d_scheduler = torch.optim.lr_scheduler.LambdaLR(d_optimizer, lambda _: 1.0)
    method.d_forward, d_optimizer = accelerator.prepare(discriminator, d_optimizer)

    def d_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return method.discriminator_loss(nets)

    return method, Update("discriminator", method.d_forward, d_optimizer, d_scheduler, d_loss,
                          cfg.optim.max_grad_norm)  # fmt: skip


def ema_update(models: Any, accelerator: Any) -> Any:
    """The full mode's EMA step; under FSDP on the shards of student and target."""
    if not is_sharded(accelerator):
        return models.update_ema

    def sharded_update() -> None:
        reshard(models.student_net, models.target_net)
        models.update_ema()

    return sharded_update


def resume(trainer: Trainer, spec: str | None, out: Path) -> None:
    """--resume: continue from a checkpoint ('latest' finding none starts from step 0)."""
    if not spec:
        return
    try:
        resumed = trainer.resume(spec)
    except (FileNotFoundError, KeyError, ConfigError) as e:
        raise ConfigError(f"--resume {spec}: {e}") from None
    if not resumed:
        log.warning("--resume latest: no checkpoint in %s yet, starting from step 0", out)


def publish(out: Path, tr: Any) -> None:
    """The model card, and the upload when asked for."""
    from lcmkit.outputs.card import write_model_card

    write_model_card(out, tr.hub_model_id)
    if tr.push_to_hub:
        from lcmkit.outputs.hub import push

        push(out, tr.hub_model_id or out.resolve().name, tr.hub_private)
