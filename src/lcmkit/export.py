"""Output formats the ecosystem loads: kohya/webui LoRA keys (ComfyUI, AUTOMATIC1111), LoRA fused into a
standalone pipeline folder, and single-file checkpoints (see single_file.py for the key layout).

Reading kohya files is diffusers' job (`lora_state_dict` converts them); writing them is ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError
from .safe_load import weights_file
from .sample import lora_file

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


def _adapter_alpha(meta: dict[str, str] | None) -> float | None:
    """lora_alpha from the peft config diffusers stores in the file's metadata, if any."""
    if not meta or "lora_adapter_metadata" not in meta:
        return None
    return json.loads(meta["lora_adapter_metadata"]).get("unet.lora_alpha")


def diffusers_to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """unet.<module>.lora_A/B.weight -> lora_unet_<module_with_underscores>.lora_down/up.weight + .alpha.

    Without a stored alpha the scale is 1, i.e. alpha = rank (what diffusers applies to such a file)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for suffix, kohya in (
            (".lora_A.weight", "lora_down"), (".lora.down.weight", "lora_down"),
            (".lora_B.weight", "lora_up"), (".lora.up.weight", "lora_up"),
        ):  # fmt: skip
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("unet.")
                name = "lora_unet_" + module.replace(".", "_")
                out[f"{name}.{kohya}.weight"] = value.contiguous()
                if kohya == "lora_down":
                    rank = value.shape[0]
                    out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
                break
        else:
            raise ConfigError(f"unexpected key {key} in a diffusers LoRA (text-encoder LoRAs are not supported)")
    return out


def export_kohya(lora: str | Path, out: str | Path, allow_pickle: bool = False) -> Path:
    """A diffusers LCM-LoRA file -> one kohya-style .safetensors (ComfyUI / AUTOMATIC1111)."""
    src = lora_file(lora, allow_pickle)
    with safe_open(str(src), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        alpha = _adapter_alpha(f.metadata())
    dst = Path(out)
    if dst.suffix != ".safetensors":
        dst = dst / "lcm_lora_kohya.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_to_kohya(state, alpha), str(dst), metadata={"ss_network_module": "networks.lora"})
    return dst


def import_kohya(
    lora: str | Path, out: str | Path, base: str, base_config: str | None = None, allow_pickle: bool = False
) -> Path:
    """A kohya/webui LoRA -> diffusers' pytorch_lora_weights.safetensors, through diffusers' own kohya reader:
    the LoRA is loaded into `base`, then saved with peft names and its alphas in the metadata."""
    from peft.utils import get_peft_model_state_dict

    from .config import ModelConfig
    from .models import load_teacher, pipeline_class
    from .sample import lcm_pipeline

    src = Path(lora).expanduser()
    if not src.is_file():
        raise ConfigError(f"{lora} is not a .safetensors LoRA file")
    src = weights_file(src, "LoRA", allow_pickle)
    with safe_open(str(src), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys() if k.startswith("lora_unet_")}
    if not modules:
        raise ConfigError(f"{lora} has no kohya UNet keys (lora_unet_...)")
    teacher = load_teacher(ModelConfig(teacher=base, teacher_config=base_config, allow_pickle=allow_pickle))
    pipe = lcm_pipeline(teacher, teacher.unet)
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
    pipeline_class(teacher.family).save_lora_weights(
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
    from .sample import FewStepGenerator

    gen = FewStepGenerator(base=base, loras=[(str(lora), weight)], base_config=base_config, device="cpu", dtype="fp32",
                           allow_pickle=allow_pickle)  # fmt: skip
    pipe: Any = gen.pipe
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    dst = Path(out)
    pipe.save_pretrained(dst, safe_serialization=True)
    return dst
