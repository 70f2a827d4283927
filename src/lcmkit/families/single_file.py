"""One-file checkpoints in the original Stable Diffusion key layout (CompVis/LDM for SD, "sgm" for SDXL).

`export_single_file` writes a diffusers pipeline's UNet, VAE and CLIP text encoder(s) into one
.safetensors that AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` load:

- UNet under `model.diffusion_model.` (down/up blocks -> input_blocks/output_blocks, resnets ->
  in_layers/out_layers/emb_layers/skip_connection; transformer blocks keep their names);
- VAE under `first_stage_model.` (down/up/mid, attention q/k/v/proj_out as 1x1 convs);
- SD 1.x text encoder (OpenAI CLIP, quick_gelu) under `cond_stage_model.transformer.text_model.`;
  SD 2.x text encoder (OpenCLIP, gelu) under `cond_stage_model.model.` (fused in_proj);
- SDXL encoder 1 under `conditioner.embedders.0.transformer.`, encoder 2 under
  `conditioner.embedders.1.model.` (OpenCLIP layout with fused in_proj and `text_projection`).

A full-LCM UNet (`time_cond_proj_dim` set) keeps its guidance projection as
`model.diffusion_model.time_embedding.cond_proj.weight`, the name LCM checkpoints in this layout use.
diffusers' single-file loader has no mapping for it (it drops the key), so `import_single_file`
restores it; other tools may ignore it and then run the model without its w input.
Schedulers, tokenizers and prediction type are not part of the file: a loader takes them from a
config folder (`config=`) or its own defaults.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lcmkit.errors import ConfigError
from lcmkit.families import families_text, family_of_components, family_of_keys
from lcmkit.families.base import Family

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
LCM_COND_PROJ_KEY = UNET_PREFIX + "time_embedding.cond_proj.weight"

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Rename = Callable[[str, Tensor], tuple[str, Tensor]]


def _keep(suffix: str, t: Tensor) -> tuple[str, Tensor]:
    return suffix, t


def _renamer(table: dict[str, str], conv_1x1: bool = False) -> Rename:
    """Rename a module suffix's leading name by `table`; optionally linear weights -> [out, in, 1, 1] convs."""

    def rename(suffix: str, t: Tensor) -> tuple[str, Tensor]:
        for old, new in table.items():
            if suffix.startswith(old + "."):
                suffix = new + suffix[len(old) :]
                if conv_1x1 and suffix.endswith(".weight") and new != "norm" and t.ndim == 2:
                    t = t.reshape(*t.shape, 1, 1)
                break
        return suffix, t

    return rename


def _map_state(state: dict[str, Tensor], table: list[tuple[str, str, Rename]], what: str) -> dict[str, Tensor]:
    """Apply a (diffusers prefix, original prefix, suffix rename) table; every key must be covered."""
    adapters = [k for k in state if ".lora_" in k or ".base_layer." in k]
    if adapters:
        raise ValueError(f"{what} has LoRA adapter weights ({adapters[0]}): merge and unload the adapters first")
    ordered = sorted(table, key=lambda row: len(row[0]), reverse=True)
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, tensor in state.items():
        for src, dst, rename in ordered:
            if key.startswith(src + "."):
                suffix, tensor = rename(key[len(src) + 1 :], tensor)
                out[f"{dst}.{suffix}"] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{what} has weights with no original-layout name: {unmapped[:3]} ({len(unmapped)} in all); "
            "only SD / SDXL architectures can be exported"
        )
    return out


def _has(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix + ".") for k in keys)


def unet_to_original(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel state -> LDM `openaimodel.UNetModel` keys (without prefix)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block {layers!r}: the original layout needs the same count in every block")
    resnet, keep = _renamer(_UNET_RESNET), _keep
    table: list[tuple[str, str, Rename]] = [
        ("conv_in", "input_blocks.0.0", keep),
        ("time_embedding.linear_1", "time_embed.0", keep),
        ("time_embedding.linear_2", "time_embed.2", keep),
        ("time_embedding.cond_proj", "time_embedding.cond_proj", keep),  # full LCM: no LDM name, see module doc
        ("add_embedding.linear_1", "label_emb.0.0", keep),
        ("add_embedding.linear_2", "label_emb.0.2", keep),
        ("conv_norm_out", "out.0", keep),
        ("conv_out", "out.2", keep),
    ]
    keys = list(state)
    index = 1
    for b in range(len(config["down_block_types"])):
        for j in range(layers):
            table.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", resnet))
            table.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", keep))
            index += 1
        if _has(keys, f"down_blocks.{b}.downsamplers.0"):
            table.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", keep))
            index += 1
    i = 0
    while _has(keys, f"mid_block.resnets.{i}"):
        table.append((f"mid_block.resnets.{i}", f"middle_block.{2 * i}", resnet))
        table.append((f"mid_block.attentions.{i}", f"middle_block.{2 * i + 1}", keep))
        i += 1
    index = 0
    for b in range(len(config["up_block_types"])):
        for j in range(layers + 1):
            table.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", resnet))
            attention = f"up_blocks.{b}.attentions.{j}"
            table.append((attention, f"output_blocks.{index}.1", keep))
            if j == layers and _has(keys, f"up_blocks.{b}.upsamplers.0"):
                slot = 2 if _has(keys, attention) else 1
                table.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv", keep))
            index += 1
    return _map_state(state, table, "UNet")


def vae_to_original(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state -> LDM `AutoencoderKL` keys (without prefix)."""
    resnet, attention, keep = _renamer(_VAE_RESNET), _renamer(_VAE_ATTENTION, conv_1x1=True), _keep
    table: list[tuple[str, str, Rename]] = [
        ("quant_conv", "quant_conv", keep),
        ("post_quant_conv", "post_quant_conv", keep),
    ]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in", f"{part}.conv_in", keep),
            (f"{part}.conv_out", f"{part}.conv_out", keep),
            (f"{part}.conv_norm_out", f"{part}.norm_out", keep),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", resnet),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", resnet),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", attention),
        ]
    for i in range(len(config["down_block_types"])):
        table.append((f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", _shifted(resnet)))
        table.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", keep))
    n_up = len(config["up_block_types"])
    for i in range(n_up):
        table.append((f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n_up - 1 - i}.block", _shifted(resnet)))
        table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n_up - 1 - i}.upsample.conv", keep))
    return _map_state(state, table, "VAE")


def _shifted(rename: Rename) -> Rename:
    """Apply `rename` after a leading index ("0.conv_shortcut.weight" -> "0.nin_shortcut.weight")."""

    def inner(suffix: str, t: Tensor) -> tuple[str, Tensor]:
        index, rest = suffix.split(".", 1)
        rest, t = rename(rest, t)
        return f"{index}.{rest}", t

    return inner


def _text_model_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP keys with the `text_model.` level (transformers >= 5.6 flattens CLIPTextModel)."""
    out = {}
    for key, t in state.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key] = t
    return out


def clip_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL encoder 1): the transformers layout itself, always with `text_model.`."""
    return _text_model_keys(state)


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def clip_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIP text model -> OpenCLIP `TextTransformer` keys (SD 2.x, SDXL encoder 2).

    q/k/v projections are fused into `attn.in_proj_weight/bias` ([q; k; v] along dim 0) and the
    projection is stored as the matrix `text_projection` [hidden, proj] (the transpose of the linear).
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    layer_prefix = "text_model.encoder.layers."
    unmapped = []
    for key, t in _text_model_keys(state).items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
        elif key.startswith(layer_prefix):
            layer, rest = key[len(layer_prefix) :].split(".", 1)
            block = f"transformer.resblocks.{layer}"
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, param), {})[module[10]] = t
            elif module in _OPEN_CLIP_LAYER:
                out[f"{block}.{_OPEN_CLIP_LAYER[module]}.{param}"] = t
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    for (block, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            unmapped.append(f"{block} {param}: {sorted(parts)}")
            continue
        out[f"{block}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped:
        raise ValueError(f"text encoder has weights with no OpenCLIP name: {unmapped[:3]} ({len(unmapped)} in all)")
    return out


def _with_prefix(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _config(module: nn.Module) -> Any:
    return module.config


def uses_open_clip(text_encoder: nn.Module) -> bool:
    """OpenCLIP (SD 2.x) vs OpenAI CLIP (SD 1.x) text encoder: OpenAI CLIP is the one with quick_gelu."""
    return getattr(_config(text_encoder), "hidden_act", "quick_gelu") != "quick_gelu"


def original_state_dict(
    unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module], family: Family
) -> dict[str, Tensor]:
    """All weights under their original (LDM / sgm) names, tensors as the modules hold them. A text encoder is
    written in OpenCLIP's layout when it is one (SD 2.x, SDXL encoder 2), else in OpenAI CLIP's; under the family's
    sgm prefixes (SDXL) or the LDM cond_stage_model."""
    if len(text_encoders) != len(family.text_encoders):
        raise ValueError(f"{family.label} needs {len(family.text_encoders)} text encoder(s), got {len(text_encoders)}")
    state = _with_prefix(UNET_PREFIX, unet_to_original(unet.state_dict(), dict(_config(unet))))
    state.update(_with_prefix(VAE_PREFIX, vae_to_original(vae.state_dict(), dict(_config(vae)))))
    for i, encoder in enumerate(text_encoders):
        open_clip = uses_open_clip(encoder)
        prefixes = family.single_file_text_prefixes
        prefix = prefixes[i] if prefixes else (SD2_TEXT_PREFIX if open_clip else SD1_TEXT_PREFIX)
        convert = clip_to_open_clip if open_clip else clip_to_original
        state.update(_with_prefix(prefix, convert(encoder.state_dict())))
    return state


def _load_components(folder: Path) -> dict[str, Any]:
    """unet, vae, text_encoder(s) and the scheduler config of a diffusers pipeline folder (nothing else)."""
    index_file = folder / "model_index.json"
    if not folder.exists():
        raise ConfigError(f"{folder} does not exist: give a diffusers pipeline folder (e.g. a full LCM's pipeline/)")
    if not index_file.is_file():
        raise ConfigError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    from lcmkit.safe_load import check_weights_folder

    check_weights_folder(folder, "pipeline")
    index = json.loads(index_file.read_text())
    parts: dict[str, Any] = {"_class_name": index.get("_class_name", "")}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        parts[name] = cls.from_pretrained(str(folder), subfolder=name, use_safetensors=True)
    sched = folder / "scheduler" / "scheduler_config.json"
    parts["scheduler_config"] = json.loads(sched.read_text()) if sched.is_file() else {}
    return parts


def _components(pipeline_dir_or_pipe: Any) -> dict[str, Any]:
    if isinstance(pipeline_dir_or_pipe, (str, Path)):
        return _load_components(Path(pipeline_dir_or_pipe).expanduser())
    pipe = pipeline_dir_or_pipe
    parts = {name: getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    parts = {k: v for k, v in parts.items() if v is not None}
    parts["_class_name"] = type(pipe).__name__
    scheduler = getattr(pipe, "scheduler", None)
    parts["scheduler_config"] = dict(scheduler.config) if scheduler is not None else {}
    return parts


def export_single_file(
    pipeline_dir_or_pipe: str | Path | Any, out_path: str | Path, dtype: torch.dtype | None = torch.float16
) -> Path:
    """Write the pipeline's UNet, VAE and text encoder(s) as one original-layout .safetensors.

    `pipeline_dir_or_pipe`: a diffusers pipeline folder or a loaded pipeline of a UNet family (told by its text
    encoders). `dtype`: floating tensors are cast to it (None keeps them).
    """
    from safetensors.torch import save_file

    parts = _components(pipeline_dir_or_pipe)
    missing = [n for n in ("unet", "vae", "text_encoder") if n not in parts]
    if missing:
        raise ConfigError(f"cannot export a {parts['_class_name'] or 'pipeline'} without {', '.join(missing)}")
    family = family_of_components(parts)
    if family is None:
        raise ConfigError(f"cannot export a {parts['_class_name'] or 'pipeline'}: not a {families_text()} pipeline")
    encoders = [parts[name] for name in family.text_encoders]
    state = original_state_dict(parts["unet"], parts["vae"], encoders, family)
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous()
    metadata = {"format": "pt", "lcmkit.family": family.name, "lcmkit.source_class": str(parts["_class_name"])}
    prediction = parts["scheduler_config"].get("prediction_type")
    if prediction:
        metadata["lcmkit.prediction_type"] = str(prediction)
    cond_dim = parts["unet"].config.get("time_cond_proj_dim")
    if cond_dim:
        metadata["lcmkit.time_cond_proj_dim"] = str(cond_dim)
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata=metadata)
    return out_path


def file_family(path: str | Path) -> Family:
    """The family of a single-file checkpoint, from its keys."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return family_of_keys(f.keys())


def _pipeline_class(config: str, family: Family) -> type:
    """The config folder's own pipeline class when it matches the family and loads single files."""
    import diffusers

    default = family.pipeline_class()
    index = Path(config) / "model_index.json"
    if not index.is_file():
        return default
    info = json.loads(index.read_text())
    cls = getattr(diffusers, str(info.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_single_file") or family_of_components(info) != family:
        return default
    return cls


def import_single_file(
    path: str | Path, config: str, family: Family | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> Any:
    """Load an original-layout .safetensors with diffusers' `from_single_file`, configs from a local folder.

    Works offline (`config` is a diffusers pipeline folder). Beyond a plain `from_single_file` call it
    restores the full-LCM `time_embedding.cond_proj` (which diffusers drops) and, for SDXL, loads
    `text_encoder_2` from `conditioner.embedders.1` alone when both encoders have the same width
    (diffusers then cannot tell them apart and would fill encoder 2 from encoder 1's weights).
    """
    from safetensors import safe_open

    path = str(Path(path).expanduser())
    family = family or file_family(path)
    cls = _pipeline_class(config, family)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        cond_proj = f.get_tensor(LCM_COND_PROJ_KEY) if LCM_COND_PROJ_KEY in keys else None
        enc1_width = None
        prefixes = family.single_file_text_prefixes
        enc1_pos = prefixes[0] + "text_model.embeddings.position_embedding.weight" if len(prefixes) > 1 else None
        if enc1_pos in keys:
            enc1_width = f.get_slice(enc1_pos).get_shape()[-1]
    if cond_proj is not None and "unet" not in kwargs:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_single_file(
            path, config=config, subfolder="unet", low_cpu_mem_usage=False, time_cond_proj_dim=cond_proj.shape[1]
        )
        with torch.no_grad():
            unet.time_embedding.cond_proj.weight.copy_(cond_proj)
        if unet.dtype != dtype:
            unet.to(dtype)
        kwargs["unet"] = unet
    if len(prefixes) > 1 and "text_encoder_2" not in kwargs:
        encoder_2 = _sdxl_encoder_2_if_ambiguous(path, config, keys, enc1_width, prefixes[1], dtype)
        if encoder_2 is not None:
            kwargs["text_encoder_2"] = encoder_2
    from lcmkit.runtime import dtype_kwarg

    return cls.from_single_file(path, config=config, **dtype_kwarg(dtype), **kwargs)


def _sdxl_encoder_2_if_ambiguous(
    path: str, config: str, keys: list[str], enc1_width: int | None, prefix: str, dtype: torch.dtype
) -> nn.Module | None:
    """diffusers picks SDXL encoder 2's weights by width; with equal widths load it from embedders.1 only."""
    import transformers
    from safetensors import safe_open

    index_file, te2_config = Path(config) / "model_index.json", Path(config) / "text_encoder_2" / "config.json"
    if enc1_width is None or not index_file.is_file() or not te2_config.is_file():
        return None  # a hub id as config: real SDXL encoders differ in width, nothing to disambiguate
    entry = json.loads(index_file.read_text()).get("text_encoder_2")
    if not entry or entry[0] is None:
        return None
    if json.loads(te2_config.read_text()).get("hidden_size") != enc1_width:
        return None
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    with safe_open(path, "pt") as f:
        checkpoint = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    cls = getattr(transformers, entry[1])
    return create_diffusers_clip_model_from_ldm(
        cls, checkpoint, subfolder="text_encoder_2", config=config, torch_dtype=dtype, local_files_only=True
    )
