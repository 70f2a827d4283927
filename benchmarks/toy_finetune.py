"""A fine-tune of the shipped toy teacher, for measuring `lcmkit distill --init-lora` on the toy world.

The toy world has one teacher; a user adapting a published LCM-LoRA has a fine-tune of its base. This makes one the
way fine-tunes are made: the teacher's UNet trained further (epsilon MSE, classifier-free caption dropout) on toy
images it has not seen (another seed), with a higher learning rate and no EMA, so its weights move away from the
base the LoRA was distilled on. The result is a diffusers folder beside which `lcmkit distill --teacher DIR` runs.

    python benchmarks/toy_finetune.py --out runs/ft-teacher --steps 400
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lcmkit.toy.demo import toy_teacher
    from lcmkit.toy.world import render_array, sample_scenes, sample_seed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cond-dropout", type=float, default=0.1)
    parser.add_argument("--offset-noise", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.0, help="save an EMA of the weights (the toy teacher's "
                        "own recipe: 0.999); 0: the last weights")  # fmt: skip
    args = parser.parse_args()

    base = toy_teacher()
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    scenes = sample_scenes(args.images, args.seed)
    seeds = [sample_seed(args.seed, i) for i in range(len(scenes))]
    with torch.no_grad():
        pixels = torch.from_numpy(render_array(scenes, seeds)).permute(0, 3, 1, 2).float() / 127.5 - 1
        posteriors = [pipe.vae.encode(pixels[i : i + 500]).latent_dist for i in range(0, len(pixels), 500)]
        means, stds = torch.cat([d.mean for d in posteriors]), torch.cat([d.std for d in posteriors])
        scaling = pipe.vae.config.scaling_factor
        captions = [s.caption() for s in scenes]
        ids = pipe.tokenizer(captions + [""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        text = torch.cat([pipe.text_encoder(ids[i : i + 500])[0] for i in range(0, len(ids), 500)])
    hidden, empty = text[:-1], text[-1:]

    unet = pipe.unet.train()
    ema = [p.detach().clone() for p in unet.parameters()] if args.ema_decay else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(means), (args.batch_size,), generator=g)
        # a sample of the VAE posterior, as the teacher was trained (its means alone make a sharper, other target)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        cond = hidden[idx].clone()
        cond[torch.rand(args.batch_size, generator=g) < args.cond_dropout] = empty
        eps = torch.randn(z0.shape, generator=g)  # with the teacher's own offset noise (its recipe's 0.1)
        eps = eps + args.offset_noise * torch.randn((*z0.shape[:2], 1, 1), generator=g)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.batch_size,), generator=g)
        pred = unet(noise_schedule.add_noise(z0, eps, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - args.ema_decay)
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({(time.perf_counter() - t0) / step:.2f} s/step)", flush=True)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    unet.eval()
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(unet.parameters(), ema):
                p.copy_(e)
    pipe.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        drift = sum((a - b).pow(2).sum() for a, b in zip(unet.parameters(), StableDiffusionPipeline.from_pretrained(
            base).unet.parameters())).sqrt()  # fmt: skip
        norm = sum(p.pow(2).sum() for p in unet.parameters()).sqrt()
    print(f"fine-tune of {base}: {args.steps} steps -> {out}; relative weight change {float(drift / norm):.4f}")


if __name__ == "__main__":
    main()
