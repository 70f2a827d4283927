"""kohya/webui LoRA keys (ComfyUI, AUTOMATIC1111). Reading kohya files is diffusers' job (`lora_state_dict`
converts them); writing them is ours."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lcmkit.errors import ConfigError
from lcmkit.safe_load import lora_file

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


def _adapter_alpha(meta: dict[str, str] | None, denoiser: str = "unet") -> float | None:
    """lora_alpha from the peft config diffusers stores in the file's metadata, if any."""
    if not meta or "lora_adapter_metadata" not in meta:
        return None
    return json.loads(meta["lora_adapter_metadata"]).get(f"{denoiser}.lora_alpha")


def with_alphas(state: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A transformer (SD3/FLUX) LoRA for ComfyUI: the diffusers keys as they are (ComfyUI maps `transformer.`
    lora_A/lora_B keys of both families onto its own layout) plus `<module>.alpha`, which ComfyUI reads for the
    scale alpha / rank (without it the scale is 1)."""
    out = {k: v.contiguous() for k, v in state.items()}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            rank = value.shape[0]
            out[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return out


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
    """A diffusers LCM-LoRA file -> one kohya-style .safetensors (ComfyUI / AUTOMATIC1111); an SD3/FLUX one -> the
    diffusers keys with alphas, the layout ComfyUI reads for those families (see `with_alphas`)."""
    src = lora_file(lora, allow_pickle)
    with safe_open(str(src), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
        alpha = _adapter_alpha(meta)
    transformer = any(k.startswith("transformer.") for k in state)
    if transformer:
        alpha = _adapter_alpha(meta, "transformer")
    dst = Path(out)
    if dst.suffix != ".safetensors":
        dst = dst / "lcm_lora_kohya.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    converted = with_alphas(state, alpha) if transformer else diffusers_to_kohya(state, alpha)
    save_file(converted, str(dst), metadata={"ss_network_module": "networks.lora"})
    return dst
