"""Turn a LoRA into what other tools load: a standalone fused pipeline folder, or a kohya LoRA into diffusers keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from lcmkit.errors import ConfigError
from lcmkit.formats.kohya import DIFFUSERS_LORA
from lcmkit.safe_load import weights_file


def import_kohya(
    lora: str | Path, out: str | Path, base: str, base_config: str | None = None, allow_pickle: bool = False
) -> Path:
    """A kohya/webui LoRA -> diffusers' pytorch_lora_weights.safetensors, through diffusers' own kohya reader:
    the LoRA is loaded into `base`, then saved with peft names and its alphas in the metadata."""
    from peft.utils import get_peft_model_state_dict

    from lcmkit.families.teacher import ModelConfig, load_teacher
    from lcmkit.infer.pipelines import teacher_pipeline

    src = Path(lora).expanduser()
    if not src.is_file():
        raise ConfigError(f"{lora} is not a .safetensors LoRA file")
    src = weights_file(src, "LoRA", allow_pickle)
    with safe_open(str(src), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys() if k.startswith("lora_unet_")}
    if not modules:
        raise ConfigError(f"{lora} has no kohya UNet keys (lora_unet_...)")
    teacher = load_teacher(ModelConfig(teacher=base, teacher_config=base_config, allow_pickle=allow_pickle))
    pipe = teacher_pipeline(teacher, teacher.denoiser, teacher.scheduler)  # only to load the LoRA into
    try:
        pipe.load_lora_weights(str(src.parent), weight_name=src.name, adapter_name="lcm")
    except Exception as e:
        raise ConfigError(f"{lora} does not load into {base}: {str(e).splitlines()[0]}") from None
    state = get_peft_model_state_dict(pipe.unet, adapter_name="lcm")
    loaded = {k.split(".lora_")[0] for k in state}
    if len(loaded) != len(modules):
        raise ConfigError(f"{lora}: only {len(loaded)} of its {len(modules)} modules match {base}")
    config = pipe.unet.peft_config["lcm"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    teacher.family.pipeline_class().save_lora_weights(
        str(dst), unet_lora_layers=state, unet_lora_adapter_metadata=config, safe_serialization=True
    )
    return dst / DIFFUSERS_LORA


def fuse_lora(
    base: str,
    lora: str | Path,
    out: str | Path,
    base_config: str | None = None,
    weight: float = 1.0,
    allow_pickle: bool = False,
) -> Path:
    """Base + LCM-LoRA fused into a standalone pipeline folder with LCMScheduler."""
    from lcmkit.infer.generator import FewStepGenerator

    gen = FewStepGenerator(base=base, loras=[(str(lora), weight)], base_config=base_config, device="cpu", dtype="fp32",
                           allow_pickle=allow_pickle)  # fmt: skip
    pipe: Any = gen.pipe
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    dst = Path(out)
    pipe.save_pretrained(dst, safe_serialization=True)
    return dst
