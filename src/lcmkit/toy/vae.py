"""A small diffusers AutoencoderKL for the toy world: 32x32x3 pixels <-> 16x16x4 latents.

The VAE is the ceiling of everything trained on top of it (DESIGN.md section 5: with 8x8x4 latents only
63% of reconstructions kept their scene), so it is judged by the pixel checker, not only by PSNR:
`eval_vae` encodes, decodes and asks `checker.check` whether the reconstruction still shows the scene.

Run: python -m lcmkit.toy.vae --out /work/toyrun/vae --steps 2000
The run checkpoints every few minutes (atomically) and resumes from its last checkpoint when restarted.
At the end it saves `<out>/vae` (save_pretrained, with scaling_factor = 1 / std of the latents, like
SD's 0.18215) and `<out>/metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from lcmkit.toy.checker import check
from lcmkit.toy.world import ATTRIBUTES, IMAGE_SIZE, render_array, sample_scenes, sample_seed

# 2 down blocks -> downsampling 2: 32 px images, 16x16x4 latents.
TOY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the latents after training
}


def build_toy_vae(**overrides: Any) -> AutoencoderKL:
    """A freshly initialised toy AutoencoderKL (TOY_VAE_CONFIG with `overrides`)."""
    return AutoencoderKL(**{**TOY_VAE_CONFIG, **overrides})


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (n, 3, h, w) in [-1, 1] -> uint8 (n, h, w, 3)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def training_batch(step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of training step `step`: fresh scenes and jitters, a pure function of (seed, step)."""
    stream = sample_seed(seed, step)
    scenes = sample_scenes(batch_size, stream)
    return to_tensor(render_array(scenes, [sample_seed(stream, i) for i in range(batch_size)]))


@torch.no_grad()
def eval_vae(vae: AutoencoderKL, n: int = 500, seed: int = 123, batch_size: int = 100) -> dict[str, Any]:
    """Reconstruct `n` held-out renders (encode -> latent mode -> decode) and judge them.

    Returns PSNR (dB, mean over images, on the uint8 reconstructions), the fraction of reconstructions
    the checker reads as the original scene (overall and per attribute), failure counts by attribute
    and by (shape, size), and the mean/std of the latents (means of latent_dist, unscaled).
    """
    was_training = vae.training
    vae.eval()
    scenes = sample_scenes(n, seed)
    psnrs: list[float] = []
    passed = 0
    attribute_ok: Counter[str] = Counter()
    failures_by_attribute: Counter[str] = Counter()
    failures_by_kind: Counter[str] = Counter()
    latents = []
    for start in range(0, n, batch_size):
        chunk = scenes[start : start + batch_size]
        originals = render_array(chunk, [sample_seed(seed, start + i) for i in range(len(chunk))])
        posterior = vae.encode(to_tensor(originals)).latent_dist
        latents.append(posterior.mean)
        recon = to_uint8(vae.decode(posterior.mode()).sample)
        mse = ((recon.astype(np.float64) - originals.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
        psnrs.extend((10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))).tolist())
        for scene, image in zip(chunk, recon):
            reading = check(image)
            passed += reading == scene
            for name in ATTRIBUTES:
                ok = reading is not None and getattr(reading, name) == getattr(scene, name)
                attribute_ok[name] += ok
                failures_by_attribute[name] += not ok
            if reading != scene:
                failures_by_kind[f"{scene.size} {scene.shape}"] += 1
    all_latents = torch.cat(latents)
    latent_std = float(all_latents.std())
    vae.train(was_training)
    return {
        "n": n,
        "eval_seed": seed,
        "psnr": float(np.mean(psnrs)),
        "checker_pass_rate": passed / n,
        "attribute_pass_rate": {name: attribute_ok[name] / n for name in ATTRIBUTES},
        "failures_by_attribute": dict(failures_by_attribute),
        "failures_by_kind": dict(sorted(failures_by_kind.items())),
        "latent_mean": float(all_latents.mean()),
        "latent_std": latent_std,
        "scaling_factor": 1.0 / latent_std,
    }


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then move it onto `path` in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, vae: AutoencoderKL, optimizer, scheduler, step: int, elapsed: float) -> None:
    """Write model-<step>.safetensors and state-<step>.pt, then point latest.json at them; drop older ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    _atomic_write(ckpt_dir / f"model-{step}.safetensors", lambda p: save_file(weights, str(p)))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    _atomic_write(ckpt_dir / f"state-{step}.pt", lambda p: torch.save(state, p))
    latest = {"step": step, "elapsed_s": elapsed}
    _atomic_write(ckpt_dir / "latest.json", lambda p: p.write_text(json.dumps(latest)))
    for old in [*ckpt_dir.glob("model-*.safetensors"), *ckpt_dir.glob("state-*.pt")]:
        if old.name not in (f"model-{step}.safetensors", f"state-{step}.pt"):
            old.unlink(missing_ok=True)


def load_checkpoint(ckpt_dir: Path, vae: AutoencoderKL, optimizer, scheduler) -> tuple[int, float]:
    """Restore the latest checkpoint in `ckpt_dir`; returns (step, elapsed seconds), (0, 0.0) if none."""
    latest_path = ckpt_dir / "latest.json"
    if not latest_path.exists():
        return 0, 0.0
    latest = json.loads(latest_path.read_text())
    step = int(latest["step"])
    vae.load_state_dict(load_file(str(ckpt_dir / f"model-{step}.safetensors")))
    state = torch.load(ckpt_dir / f"state-{step}.pt", weights_only=True)  # optimizer/scheduler state: no code
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return step, float(latest["elapsed_s"])


def train_vae(
    out_dir: str | os.PathLike,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-5,
    seed: int = 0,
    resume: bool = True,
    num_threads: int | None = 1,
    progress: bool = True,
    checkpoint_minutes: float = 3.0,
    warmup_steps: int = 100,
    eval_n: int = 500,
    vae_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the toy VAE on freshly rendered scenes; returns (and writes) the measured metrics.

    Loss: L1 + MSE reconstruction of a posterior sample, plus `kl_weight` x KL to N(0, I).
    Learning rate: linear warmup, then cosine decay to 10%. Checkpoints go to <out>/checkpoint,
    the final model to <out>/vae, the metrics to <out>/metrics.json.
    """
    from tqdm.auto import tqdm

    if num_threads:
        torch.set_num_threads(num_threads)
    out = Path(out_dir)
    ckpt_dir = out / "checkpoint"
    torch.manual_seed(seed)
    vae = build_toy_vae(**(vae_overrides or {}))
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_frac = (step - warmup_steps) / max(steps - warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_step, elapsed = load_checkpoint(ckpt_dir, vae, optimizer, scheduler) if resume else (0, 0.0)

    generator = torch.Generator().manual_seed(seed)
    last_save = time.monotonic()
    session_start = time.monotonic()
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not progress, desc="vae")
    step = start_step
    for step in bar:
        pixels = training_batch(step, batch_size, seed)
        posterior = vae.encode(pixels).latent_dist
        generator.manual_seed(sample_seed(seed + 1, step))  # reproducible across resumes
        recon = vae.decode(posterior.sample(generator)).sample
        l1 = F.l1_loss(recon, pixels)
        mse = F.mse_loss(recon, pixels)
        kl = posterior.kl().mean() / (4 * 16 * 16)  # per latent element
        loss = l1 + mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 10 == 0:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            bar.set_postfix(l1=f"{l1.item():.4f}", psnr=f"{psnr:.1f}", kl=f"{kl.item():.1f}")
        if time.monotonic() - last_save > checkpoint_minutes * 60 and step + 1 < steps:
            save_checkpoint(ckpt_dir, vae, optimizer, scheduler, step + 1, elapsed + time.monotonic() - session_start)
            last_save = time.monotonic()
    bar.close()
    train_time = elapsed + time.monotonic() - session_start
    if steps > start_step:
        save_checkpoint(ckpt_dir, vae, optimizer, scheduler, steps, train_time)

    metrics = eval_vae(vae, n=eval_n)
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    vae.save_pretrained(out / "vae")
    metrics.update(
        {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "kl_weight": kl_weight,
            "seed": seed,
            "train_wall_time_s": train_time,
            "parameters": sum(p.numel() for p in vae.parameters()),
            "num_threads": torch.get_num_threads(),
            "config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=list))
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m lcmkit.toy.vae --out DIR --steps N."""
    parser = argparse.ArgumentParser(description="Train the toy-world AutoencoderKL (32 px -> 16x16x4).")
    parser.add_argument("--out", required=True, help="output directory (checkpoint/, vae/, metrics.json)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    metrics = train_vae(
        args.out,
        args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        seed=args.seed,
        resume=not args.no_resume,
        num_threads=args.threads,
        progress=not args.no_progress,
        checkpoint_minutes=args.checkpoint_minutes,
        eval_n=args.eval_n,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
