"""LoRA files at inference: find, check against a UNet, read an LCM-LoRA's sampling facts, parse PATH:WEIGHT."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lcmkit.families.base import Family


def lora_target_modules(path: str | Path, family: Family) -> dict[str, tuple[int, ...]]:
    """UNet module name -> shape of its LoRA down (A) weight, read from a diffusers/peft LoRA file, or from a
    kohya/webui file through diffusers' own converter (the one load_lora_weights uses)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if any(k.startswith(("lora_unet_", "lora_te")) for k in shapes):
        try:
            state, _ = family.pipeline_class().lora_state_dict(str(path))
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
                name = name.removeprefix("unet.").removeprefix("transformer.").removeprefix("base_model.model.")
                targets[name] = shape
    return targets


def check_lora_matches(unet: torch.nn.Module, path: str | Path, family: Family) -> None:
    """Refuse a LoRA that matches no UNet module, or one made for another base (shapes differ)."""
    from lcmkit.errors import ConfigError

    targets = lora_target_modules(path, family)
    if not targets:
        raise ConfigError(f"LoRA {path} has no {family.denoiser} LoRA weights (diffusers/peft lora_A or kohya "
                          "lora_unet_ keys)")  # fmt: skip
    modules = dict(unet.named_modules())
    matched = [n for n in targets if n in modules]
    if not matched:
        example = next(iter(targets))
        raise ConfigError(f"LoRA {path} matches no module of this {family.name.upper()} {family.denoiser} "
                          f"(e.g. {example}): it was made for another model")  # fmt: skip
    for name in matched:
        layer = modules[name]
        fan_in = layer.in_channels if hasattr(layer, "in_channels") else getattr(layer, "in_features", None)
        if fan_in is not None and targets[name][1] != fan_in:
            raise ConfigError(f"LoRA {path} does not fit this {family.name.upper()} base ({name} expects {fan_in} "
                              f"inputs, the LoRA has {targets[name][1]}): it was made for another family")  # fmt: skip




def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'path[:weight]' -> (path, weight); a Windows drive letter or a path with ':' stays whole."""
    from lcmkit.errors import ConfigError

    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(weight)
        except ValueError:
            raise ConfigError(f"--lora {spec}: the weight after ':' must be a number") from None
    return spec, 1.0
