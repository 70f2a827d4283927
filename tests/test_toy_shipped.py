"""The shipped toy teacher and its LCM-LoRA load offline with plain diffusers and draw what they are asked."""

from __future__ import annotations

import numpy as np
import torch

from lcmkit.toy.checker import prompt_accuracy
from lcmkit.toy.demo import FLOW_LORA_DIR, LORA_DIR, toy_prompts
from lcmkit.toy.ship import SHIPPED_FLOW_TEACHER, SHIPPED_TEACHER

PROMPTS = toy_prompts(40, seed=7)


def draw(pipe, steps: int, guidance: float, **kwargs) -> list[np.ndarray]:
    torch.manual_seed(0)  # FlowMatchLCMScheduler re-noises from the global generator
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)  # fmt: skip
    return [(im * 255).round().astype(np.uint8) for im in out.images]


def test_shipped_teacher_and_lcm_lora_load_offline_and_draw_the_prompt():
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_TEACHER)  # as a user would: no dtype, offline
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert prompt_accuracy(draw(pipe, 25, 5.0), PROMPTS) >= 0.7  # the card's DPM++ 25 figure is ~0.9

    # The toy world is simple enough that the bare teacher under LCMScheduler draws well at 4 steps; at 2 steps
    # it does not, and the LCM-LoRA does (on 40 prompts: 68% -> 100%).
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    without = draw(pipe, 2, 1.0)
    pipe.load_lora_weights(str(LORA_DIR))
    with_lora = draw(pipe, 2, 1.0)
    assert np.abs(np.stack(with_lora).astype(int) - np.stack(without)).mean() > 3  # the LoRA changes the image
    assert prompt_accuracy(with_lora, PROMPTS) >= 0.8  # ...into what was asked, in 2 steps
    assert prompt_accuracy(with_lora, PROMPTS) >= prompt_accuracy(without, PROMPTS) + 0.15


def test_generate_with_the_toy_aliases_under_both_samplers(tmp_path):
    """`lcmkit generate --base toy --lora toy`: the shipped pair, offline; --scheduler tcd draws the prompt too,
    from the same seeds, with different pixels than LCMScheduler."""
    from PIL import Image

    from lcmkit.app.cli import main

    prompt = PROMPTS[0]
    drawn = {}
    for scheduler in ("lcm", "tcd"):
        out = tmp_path / scheduler
        args = ["generate", "--base", "toy", "--lora", "toy", "--prompt", prompt, "--num-images", "4", "--scheduler",
                scheduler, "--tcd-gamma", "0.3", "--out", str(out)]  # fmt: skip
        assert main(args) == 0
        drawn[scheduler] = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("*.png"))]
        assert len(drawn[scheduler]) == 4 and prompt_accuracy(drawn[scheduler], [prompt] * 4) >= 0.75
    assert np.abs(np.stack(drawn["lcm"]).astype(int) - np.stack(drawn["tcd"]).astype(int)).max() > 20


def test_shipped_flow_teacher_and_lora_load_offline_in_the_sd3_pipeline_and_draw_the_prompt():
    """The flow LoRA draws in 2 steps what the guided teacher (guidance 5, the ODE it was distilled from) needs many
    Euler steps for. (The unguided teacher is good at few steps too in this near-deterministic world:
    docs/toy-world.md.)"""
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(SHIPPED_FLOW_TEACHER)  # as a user would: no dtype, offline
    pipe.set_progress_bar_config(disable=True)
    short = {"max_sequence_length": 16}  # the card says so: the toy's T5 tokenizer has 16 positions
    assert prompt_accuracy(draw(pipe, 28, 5.0, **short), PROMPTS) >= 0.9  # the card's Euler 28 figure is 100%
    two = {**short, "sigmas": [1.0, 0.5]}
    guided_two = prompt_accuracy(draw(pipe, 2, 5.0, **two), PROMPTS)  # the card's Euler 2 figure: ~45%

    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    without = draw(pipe, 2, 1.0, **two)
    pipe.load_lora_weights(str(FLOW_LORA_DIR))
    with_lora = draw(pipe, 2, 1.0, **two)
    assert np.abs(np.stack(with_lora).astype(int) - np.stack(without)).mean() > 1.5  # the LoRA changes the image
    assert prompt_accuracy(with_lora, PROMPTS) >= 0.8  # ...and draws what was asked, in 2 steps
    assert prompt_accuracy(with_lora, PROMPTS) >= guided_two + 0.3


def test_the_package_stays_small():
    """Both toy teachers and their LoRAs ship inside the wheel: each teacher <= 15 MB, the package < 45 MB."""
    from pathlib import Path

    import lcmkit

    def mb(folder: Path) -> float:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts) / 2**20

    assert mb(SHIPPED_TEACHER) <= 15 and mb(SHIPPED_FLOW_TEACHER) <= 15
    assert mb(Path(lcmkit.__file__).parent) < 45
