"""`lcmkit info PATH`: say what a file or folder is, reading only headers and configs (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcmkit.errors import ConfigError, first_line
from lcmkit.families import family_of_components, family_of_cross_attention, family_of_keys, family_of_unet_config
from lcmkit.families.flux import FLUX
from lcmkit.families.unet import UNET_LORA_TARGETS
from lcmkit.safe_load import PICKLE_SUFFIXES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise ConfigError(f"{path} is not a readable .safetensors file: {str(e).splitlines()[0]}") from None


def _lora_info(shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> dict[str, Any] | None:
    kohya = [k for k in shapes if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")]
    peft = [k for k in shapes if k.endswith((".lora_A.weight", ".lora.down.weight"))]
    downs = kohya or peft
    if not downs:
        return None
    ranks = sorted({shapes[k][0] for k in downs})
    names = [k.split(".lora")[0].removeprefix("unet.").removeprefix("lora_unet_") for k in downs]
    kinds = sorted({target_name(n, kohya=bool(kohya)) for n in names})
    cross = [shapes[k][1] for k in downs if "attn2.to_k" in k or "attn2_to_k" in k]
    # The text width a UNet cross-attends to tells the base family apart.
    family = "unknown"
    if cross:
        family = family_of_cross_attention(cross[0]) or f"unknown (cross-attention width {cross[0]})"
    info: dict[str, Any] = {
        "kind": "LoRA", "format": "kohya/webui" if kohya else "diffusers/peft", "modules": len(downs),
        "rank": ranks[0] if len(ranks) == 1 else ranks, "targets": kinds, "base_family": family,
    }  # fmt: skip
    if "lora_adapter_metadata" in meta:
        cfg = json.loads(meta["lora_adapter_metadata"])
        info["alpha"] = cfg.get("unet.lora_alpha")
    alphas = [k for k in shapes if k.endswith(".alpha")]
    if alphas:
        info["alpha"] = "per module (kohya .alpha)"
    return info


def target_name(module: str, kohya: bool = False) -> str:
    """The LoRA target a module name ends in ('...attn1.to_out.0' -> 'to_out.0', '...resnets.0.conv1' -> 'conv1'):
    the longest known target, else the module's own name (with its index when it ends in one)."""
    sep = "_" if kohya else "."
    forms = {t: t.replace(".", sep) for t in (*UNET_LORA_TARGETS, *FLUX.lora_targets)}
    known = [t for t, form in forms.items() if module == form or module.endswith(sep + form)]
    if known:
        return max(known, key=len)
    parts = module.split(sep)
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]


def _file(p: Path, path: str | Path) -> dict[str, Any]:
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _image(p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ConfigError(f"{path}: a pickle-based weights file; lcmkit info does not open those (unpickling can run "
                          "code): convert it to .safetensors first")  # fmt: skip
    if p.suffix != ".safetensors":
        raise ConfigError(f"{path}: not a .safetensors file, an image or a folder lcmkit knows")
    shapes, meta = safetensors_header(p)
    lora = _lora_info(shapes, meta)
    if lora is not None:
        return {"path": str(p), **lora}
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        lcm = "model.diffusion_model.time_embedding.cond_proj.weight" in shapes
        return {"path": str(p), "kind": "single-file checkpoint", "family": family_of_keys(shapes).name,
                "full_lcm": lcm, "tensors": len(shapes)}  # fmt: skip
    return {"path": str(p), "kind": "safetensors file", "tensors": len(shapes)}


def _image(p: Path) -> dict[str, Any]:
    """An image: its size, and the generation parameters lcmkit generate stores in a PNG."""
    from PIL import Image

    try:
        with Image.open(p) as image:
            size, text = image.size, dict(getattr(image, "text", {}) or {})
    except Exception as e:
        raise ConfigError(f"{p}: not a readable image ({first_line(e)})") from None
    info: dict[str, Any] = {"path": str(p), "kind": "image", "size": f"{size[0]}x{size[1]}"}
    try:
        info.update(json.loads(text["lcmkit"]))
    except (KeyError, ValueError):
        info["generated_by"] = "not lcmkit (no generation parameters in it)"
    return info


def _run(p: Path) -> dict[str, Any]:
    """A distill output folder: what was distilled, how, and how far it got."""
    run = json.loads((p / "lcmkit_run.json").read_text()) if (p / "lcmkit_run.json").is_file() else {}
    cfg = run.get("config", {})
    lcd, latest = cfg.get("lcd", {}), p / "checkpoints" / "latest"
    info = {"path": str(p), "kind": "lcmkit run" if run else "unfinished lcmkit run", "mode": run.get("mode"),
            "family": run.get("family"), "teacher": cfg.get("model", {}).get("teacher"), "steps": run.get("steps"),
            "num_ddim_timesteps": lcd.get("num_ddim_timesteps"),
            "w_range": f"{lcd['w_min']:g}-{lcd['w_max']:g}" if "w_min" in lcd else None,
            "final_loss": run.get("final_loss"),
            "latest_checkpoint": latest.read_text().strip() if latest.is_file() else None}  # fmt: skip
    if not run:
        info.update(_last_logged(p))
    lora = p / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        weights = _lora_info(*safetensors_header(lora)) or {}
        info["weights"] = f"{lora.name}: LoRA rank {weights.get('rank')}, {weights.get('modules')} modules"
    elif (p / "pipeline" / "model_index.json").is_file():
        net = "transformer" if (p / "transformer").is_dir() else "unet"
        info["weights"] = f"pipeline/ (a full LCM), {net}/ (its EMA {net}), {net}_online/"
    return info


def _last_logged(p: Path) -> dict[str, Any]:
    """Of an unfinished run: its last logged step and loss."""
    log = p / "logs" / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    rows = [r for r in rows if "loss" in r]
    return {"steps": rows[-1]["step"], "last_loss": rows[-1]["loss"]} if rows else {}


def describe(path: str | Path) -> dict[str, Any]:
    """A dict describing PATH; raises ConfigError when it is nothing lcmkit knows."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{path} does not exist")
    if p.is_file():
        return _file(p, path)
    if (p / "lcmkit_run.json").is_file() or (p / "checkpoints" / "latest").is_file():
        return _run(p)
    if (p / "pytorch_lora_weights.safetensors").is_file():
        return describe(p / "pytorch_lora_weights.safetensors") | {"folder": str(p)}
    if (p / "model_index.json").is_file():
        index = json.loads((p / "model_index.json").read_text())
        unet = json.loads((p / "unet" / "config.json").read_text()) if (p / "unet" / "config.json").is_file() else {}
        sched = p / "scheduler" / "scheduler_config.json"
        sched_cfg = json.loads(sched.read_text()) if sched.is_file() else {}
        flow = str(sched_cfg.get("_class_name", "")).startswith("FlowMatch")
        lcm = unet.get("time_cond_proj_dim") is not None  # a flow student: the scheduler it was saved with
        lcm = sched_cfg.get("_class_name") == "FlowMatchLCMScheduler" if flow else lcm
        return {
            "path": str(p), "kind": "pipeline", "class": index.get("_class_name"),
            "family": getattr(family_of_components(index, index.get("_class_name", "")), "name", None),
            "full_lcm": lcm, "scheduler": sched_cfg.get("_class_name"),
            "prediction_type": "flow" if flow else sched_cfg.get("prediction_type", "epsilon"),
        }  # fmt: skip
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("_class_name") == "UNet2DConditionModel":
            return {"path": str(p), "kind": "UNet", "full_lcm": cfg.get("time_cond_proj_dim") is not None,
                    "time_cond_proj_dim": cfg.get("time_cond_proj_dim"),
                    "family": family_of_unet_config(cfg)[0].name}  # fmt: skip
        return {"path": str(p), "kind": cfg.get("_class_name", "model folder")}
    if (p / "cache.json").is_file() or (p / "cache.progress.json").is_file():
        done = (p / "cache.json").is_file()
        index = json.loads((p / ("cache.json" if done else "cache.progress.json")).read_text())
        settings = index if done else index.get("settings", {})
        shards = index.get("shards", [])
        return {"path": str(p), "kind": "lcmkit cache" if done else "unfinished lcmkit cache",
                "family": settings.get("family"), "teacher": settings.get("teacher"),
                "resolution": settings.get("resolution"), "dtype": settings.get("dtype"),
                "samples": sum(s["count"] for s in shards), "shards": len(shards),
                "skipped": index.get("skipped", {})}  # fmt: skip
    if (p / "state.json").is_file() and (p / "state.safetensors").is_file():
        record = json.loads((p / "state.json").read_text())
        return {"path": str(p), "kind": "lcmkit checkpoint", "step": record.get("step"), **record.get("meta", {})}
    raise ConfigError(f"{path}: not a LoRA, pipeline, UNet, single-file checkpoint, lcmkit run, cache or checkpoint")
