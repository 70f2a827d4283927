"""`lcmkit generate`: few-step images from a base model + LCM-LoRA (+ style LoRAs), or from a full LCM."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from lcmkit.app.common import ALLOW_PICKLE_HELP, DTYPES, base_and_loras
from lcmkit.app.flags import Flags, default_of, option
from lcmkit.errors import ConfigError
from lcmkit.infer.generator import FewStepGenerator
from lcmkit.infer.sampling import DEFAULT_TCD_GAMMA, default_guidance_scale
from lcmkit.infer.schedulers import LCM_SAMPLERS

MODEL = FewStepGenerator.__init__
SAMPLE = FewStepGenerator.__call__


@dataclass
class GenerateOptions:
    base: str | None = None
    """Base model: hub id, diffusers folder or .safetensors file ('toy': the shipped one)."""
    base_config: str | None = None
    """For a single-file base offline: a diffusers folder with its configs."""
    lora: list[str] | None = option(None, action="append", metavar="PATH[:WEIGHT]")
    """LoRA to stack (repeatable), e.g. the LCM-LoRA."""
    lcm: str | None = None
    """A full LCM: a distill output folder or its pipeline/ folder."""
    prompt: list[str] | None = option(None, action="append")
    """Repeatable."""
    prompts_file: str | None = None
    """One prompt per line."""
    negative_prompt: str | None = None
    steps: int = default_of(SAMPLE, "steps")
    compile: bool = option(False, action="store_true")
    """torch.compile the UNet and VAE decoder (LoRAs fused in): faster images after a one-time compile of minutes;
    worth it for many images."""
    guidance: float | None = option(None, help=f"default: {default_guidance_scale(False):g} with a LoRA, "
                                    f"{default_guidance_scale(True):g} for a full LCM (FLUX: 3.5, its guidance "
                                    "input; a full SD3 student: 1)")  # fmt: skip
    seed: int = default_of(SAMPLE, "seed")
    """Image i uses seed + i."""
    num_images: int = 1
    """Images per prompt."""
    batch_size: int = default_of(SAMPLE, "batch_size")
    width: int | None = None
    height: int | None = None
    scheduler: str = option(default_of(MODEL, "scheduler"), choices=LCM_SAMPLERS)
    tcd_gamma: float = DEFAULT_TCD_GAMMA
    """With --scheduler tcd: TCD's gamma in [0, 1]."""
    image: str | None = None
    """Init image for img2img."""
    strength: float = default_of(SAMPLE, "strength")
    """img2img strength in [0, 1]."""
    device: str = default_of(MODEL, "device")
    """auto, cuda, mps or cpu."""
    dtype: str = option(default_of(MODEL, "dtype"), choices=DTYPES)
    out: str = "generated"
    overwrite: bool = option(False, action="store_true")
    allow_pickle: bool = option(False, action="store_true", help=ALLOW_PICKLE_HELP)


GENERATE = Flags(GenerateOptions)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="few-step images from base + LCM-LoRA (+ style LoRAs) or a full LCM")
    GENERATE.add(p)
    p.set_defaults(func=run)


def prompts_of(o: GenerateOptions) -> list[str]:
    """--prompt (repeated) and the lines of --prompts-file."""
    from pathlib import Path

    prompts = list(o.prompt or [])
    if o.prompts_file:
        path = Path(o.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def init_image(path: str | None) -> Any:
    """The --image of img2img, read (None without it)."""
    from pathlib import Path

    from PIL import Image

    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--image {path} does not exist")
    try:
        init = Image.open(path)
        init.load()
    except Exception as e:
        raise ConfigError(f"--image {path} is not a readable image: {e}") from None
    return init


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcmkit.infer.images import image_paths, save_images

    o: GenerateOptions = GENERATE.build(args)
    prompts = prompts_of(o)
    if o.num_images < 1:
        raise ConfigError(f"--num-images {o.num_images}: must be >= 1")
    image_paths(Path(o.out), len(prompts) * o.num_images, o.seed, o.overwrite)  # refuse before any work
    init = init_image(o.image)
    base, loras = base_and_loras(o.base, o.lora)
    gen = FewStepGenerator(base, loras, o.lcm, o.scheduler, o.device, o.dtype, o.base_config,
                           allow_pickle=o.allow_pickle, compile=o.compile)  # fmt: skip
    if o.compile:
        print("lcmkit: --compile: the first batch compiles the UNet and VAE decoder (minutes on a CPU)",
              file=sys.stderr)  # fmt: skip
    expanded = [p for p in prompts for _ in range(o.num_images)]
    images = gen(expanded, o.negative_prompt, o.steps, o.guidance, o.seed, o.width, o.height, o.batch_size, init,
                 o.strength, o.tcd_gamma, progress=True)  # fmt: skip
    info = {
        "steps": o.steps, "guidance": gen.default_guidance if o.guidance is None else o.guidance,
        "scheduler": o.scheduler, "negative_prompt": o.negative_prompt, "model": o.lcm or o.base,
        "loras": [f"{p}:{w}" for p, w in loras], "strength": o.strength if init else None,
    }  # fmt: skip
    out = save_images(images, expanded, o.out, o.seed, info, o.overwrite)
    print(f"lcmkit: {len(images)} image(s) in {out}")
    return 0
