"""Golden outputs of `lcmkit distill`: fixed-seed losses of 5 steps and a checksum of the saved weights, for the
tiny SD and SDXL teachers, full and LoRA, from raw shards and from an lcmkit cache.

They were recorded before the code was restructured (see docs/architecture.md) and tests/test_golden.py compares
every later version with them: a restructure that changes what a run computes fails it. Record anew only for a
deliberate change of behaviour, and say so in the commit:

    HF_HUB_OFFLINE=1 .venv/bin/python tests/golden_runs.py --write
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "distill.json"
STEPS = 5
CASES = [
    # (name, family, mode, data, extra flags)
    ("sd-lora-raw", "sd", "lora", "raw", []),
    ("sd-full-raw", "sd", "full", "raw", []),
    ("sdxl-lora-raw", "sdxl", "lora", "raw", []),
    ("sdxl-full-raw", "sdxl", "full", "raw", []),
    ("sd-lora-cache", "sd", "lora", "cache", []),
    ("sd-full-cache", "sd", "full", "cache", []),
    ("sdxl-lora-cache", "sdxl", "lora", "cache", []),
    ("sdxl-full-cache", "sdxl", "full", "cache", []),
    ("sdv-lora-raw-options", "sdv", "lora", "raw",
     ["--uncond", "zeros", "--caption-dropout", "0.5", "--loss", "l2", "--num-ddim-timesteps", "8",
      "--w-min", "1", "--w-max", "4", "--gradient-accumulation-steps", "2"]),
    ("sdv-full-raw-options", "sdv", "full", "raw",
     ["--mixed-precision", "bf16", "--ema-decay", "0.9", "--huber-c", "0.01", "--lr-scheduler", "cosine",
      "--guidance-embed-dim", "64"]),
]  # fmt: skip


def machine_signature() -> dict[str, str]:
    """What decides whether float results are bit-identical: the same CPU, thread count and library versions."""
    from importlib import metadata

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        **{pkg: metadata.version(pkg) for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate")},
    }


def tensors_digest(path: Path) -> dict[str, object]:
    """sha256 over every tensor's name, dtype, shape and bytes (file metadata excluded), plus float64 sums that
    survive a change of machine."""
    from safetensors.torch import load_file

    state = load_file(path)
    h = hashlib.sha256()
    total, total_abs = 0.0, 0.0
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        total += float(t.double().sum())
        total_abs += float(t.double().abs().sum())
    return {"sha256": h.hexdigest(), "tensors": len(state), "sum": total, "abs_sum": total_abs}


def weight_files(out: Path, mode: str) -> dict[str, Path]:
    if mode == "lora":
        return {"lora": out / "pytorch_lora_weights.safetensors"}
    return {
        "unet": out / "unet" / "diffusion_pytorch_model.safetensors",
        "unet_online": out / "unet_online" / "diffusion_pytorch_model.safetensors",
    }


def run_case(name: str, teachers: dict[str, str], data: dict[str, str], work: Path) -> dict[str, object]:
    from lcmkit.app.cli import main

    _, family, mode, kind, extra = next(c for c in CASES if c[0] == name)
    out = work / name
    args = [
        "distill", "--teacher", teachers[family], "--data", data[(family, kind)], "--out", str(out), "--mode", mode,
        "--max-steps", str(STEPS), "--batch-size", "2", "--resolution", "64", "--lora-rank", "4",
        "--checkpoint-every", "0", "--no-progress", "--log-every", "1", "--learning-rate", "1e-3",
        "--shuffle-buffer", "4", "--seed", "3", *extra,
    ]  # fmt: skip
    with contextlib.chdir(work):  # data paths relative to it: a sample's RNG is seeded by its path
        rc = main(args)
    if rc != 0:
        raise RuntimeError(f"golden case {name}: lcmkit distill exited {rc}")
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    return {"losses": losses, "weights": {k: tensors_digest(p) for k, p in weight_files(out, mode).items()}}


def build_inputs(work: Path) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """The tiny teachers, the shards, and one cache per family (fp32, so cached runs compare closely)."""
    from tiny_models import make_shards, make_tiny_sd, make_tiny_sdxl

    from lcmkit.app.cli import main

    teachers = {
        "sd": str(make_tiny_sd(work / "tiny-sd")),
        "sdv": str(make_tiny_sd(work / "tiny-sd-v", prediction_type="v_prediction")),
        "sdxl": str(make_tiny_sdxl(work / "tiny-sdxl")),
    }
    shards = make_shards(work / "shards").replace(f"{work}/", "")  # relative to `work`, where runs start
    data = {(f, "raw"): shards for f in teachers}
    for family in ("sd", "sdxl"):
        cache = work / f"cache-{family}"
        with contextlib.chdir(work):
            rc = main(["cache", "--teacher", teachers[family], "--data", shards, "--out", str(cache), "--resolution",
                       "64", "--no-progress", "--dtype", "fp32"])  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"golden inputs: lcmkit cache for {family} exited {rc}")
        data[(family, "cache")] = f"cache:{cache}"
    return teachers, data


def record_all(work: Path) -> dict[str, object]:
    teachers, data = build_inputs(work)
    return {
        "machine": machine_signature(),
        "steps": STEPS,
        "cases": {name: run_case(name, teachers, data, work) for name, *_ in CASES},
    }


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1:] == ["--write"]:
        target = GOLDEN
    elif len(sys.argv) == 3 and sys.argv[1] == "--to":
        target = Path(sys.argv[2])
    else:
        sys.exit("usage: python tests/golden_runs.py --write (records tests/golden/distill.json) | --to FILE.json")
    with tempfile.TemporaryDirectory() as tmp:
        result = record_all(Path(tmp))
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}")
