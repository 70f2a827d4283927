"""Where and how the networks of a run compute: device, memory layout, attention, checkpointing, compile, CPU
convolution kernels; the run lock; what a cached run can release."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lcmkit.data.base import Source
from lcmkit.distill.config import DistillConfig, TrainConfig
from lcmkit.errors import ConfigError
from lcmkit.families.models import LCDModels
from lcmkit.families.teacher import Teacher
from lcmkit.train.lock import RunLock
from lcmkit.train.session import PeerFailed, on_main

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision


def memory_layout(choice: str, device: torch.device) -> torch.memory_format:
    """--channels-last: on, off, or auto (on for CUDA, where convolutions run faster in it)."""
    on = choice == "on" or (choice == "auto" and device.type == "cuda")
    return torch.channels_last if on else torch.contiguous_format


def prepare_models(models: LCDModels, teacher: Teacher, train: TrainConfig, device: torch.device) -> None:
    """Every network on `device`, with the run's attention, gradient checkpointing and compile settings."""
    for module in (models.student_net, models.teacher_net, models.target_net, teacher.vae, *teacher.text_encoders):
        if module is not None:
            module.to(device)
    if train.attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        for unet in {models.student_net, models.teacher_net}:
            unet.set_attn_processor(AttnProcessor())
    if train.gradient_checkpointing:
        models.student_net.enable_gradient_checkpointing()
    if train.compile:  # in place: parameter names, checkpoints and saved weights stay as they are
        for unet in (models.student_net, models.teacher_net, models.target_net):
            if unet is not None:  # never inductor's freezing: it bakes the weights in, and these change every step
                unet.compile(options={"freezing": False})


SMALL_UNET_PARAMS = 50_000_000


SMALL_CONV_POSITIONS = 2048
"""Latent positions per UNet call (batch x latent height x width) below which oneDNN's per-call setup outweighs
the work: a tiny SD at 64 px, batch 4 (256 positions) steps ~25% faster on native kernels; the toy teacher at
32 px, batch 32 (8,192 positions) 1.47x faster on oneDNN (2.63 against 3.88 s per LoRA step, one run)."""


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


def release_for_cache(source: Source, teacher: Teacher, conditioner: Any, cfg: DistillConfig) -> list[str]:
    """LoRA training from a cache encodes nothing: free the VAE encoder and (unless validation needs them to
    encode its prompts) the text encoders. (A full run keeps them: its pipeline/ output holds them.)
    Returns what was released."""
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


def flat_config(cfg: DistillConfig) -> dict[str, Any]:
    """The configuration as one flat dict (for experiment trackers)."""
    flat: dict[str, Any] = {"mode": cfg.mode}
    for values in asdict(cfg).values():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[k] = ",".join(map(str, v)) if isinstance(v, list) else v
    return {k: v for k, v in flat.items() if v is not None}
