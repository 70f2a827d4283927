"""What several commands share: the 'toy' model aliases, --lora PATH[:WEIGHT] lists, --json output, the flag
settings of the teacher/LCM options of eval and bench generate."""

from __future__ import annotations

from typing import Any

from lcmkit.runtime import PRECISIONS

DTYPES = ("auto", *PRECISIONS)
"""--dtype of the commands that run a model: auto (fp16 on CUDA/MPS, fp32 on CPU) or a precision."""
DEVICE_HELP = "auto, cuda, mps or cpu"
ALLOW_PICKLE_HELP = "read pickle-based weights (.ckpt, .pt, .bin) you trust, with torch.load(weights_only=True)"

MODEL_FLAGS: dict[str, dict[str, Any]] = {
    "teacher": {"help": "hub id, diffusers folder or .safetensors file ('toy': the shipped one)"},
    "teacher_config": {"help": "for a single-file teacher offline: a diffusers folder with its configs"},
    "lora": {"help": "the LCM-LoRA to evaluate on the teacher (file or folder; 'toy': the shipped one)"},
    "lcm": {"help": "a full LCM: a distill output folder or its pipeline/ folder"},
    "lcm_guidance": {"help": "default: 1 for an LCM-LoRA (FLUX: 3.5, its guidance input), --guidance for a full LCM"},
    "device": {"help": DEVICE_HELP},
    "dtype": {"choices": DTYPES},
}
"""The teacher and distilled-model options of eval (EvalSettings) and bench generate (GenerateBench)."""
RESOLUTION_HELP = "square image size (default: the model's native size)"

# The defaults of the server (app/server.py), here so that serve and bench serve read them without importing it.
HOST = "127.0.0.1"
PORT = 7860
MAX_CONNECTIONS = 32
MAX_STEPS = 8
"""The most LCM steps a request may ask for (the page offers 1-8)."""
LATENCY_REPEATS = 20
"""Requests per step count of bench serve (after the warm-up)."""


def split_list(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


TOY_ALIASES = ("toy", "toy-flow")
"""--teacher / --lora names of the shipped toy teacher and LCM-LoRA, and of the toy flow teacher (a tiny SD3) and its
LCM-LoRA."""


def toy_aliases(teacher: str | None, lora: str | None) -> tuple[str | None, str | None]:
    """--teacher toy|toy-flow / --lora toy|toy-flow: the shipped toy teachers and LCM-LoRAs (checked)."""
    from lcmkit.toy.demo import toy_lora, toy_teacher

    teacher = toy_teacher(flow=teacher == "toy-flow") if teacher in TOY_ALIASES else teacher
    return teacher, (toy_lora(flow=lora == "toy-flow") if lora in TOY_ALIASES else lora)


def base_and_loras(base: str | None, specs: list[str] | None) -> tuple[str | None, list[tuple[str, float]]]:
    """--base and repeated --lora PATH[:WEIGHT] of generate / serve, 'toy' naming the shipped ones."""
    from lcmkit.infer.loras import parse_lora_spec

    loras = [parse_lora_spec(s) for s in specs or []]
    return toy_aliases(base, None)[0], [(str(toy_aliases(None, path)[1]), weight) for path, weight in loras]


def write_json(path: str | None, data: Any) -> None:
    """--json FILE of the bench commands: the results, indented."""
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(data, indent=2) + "\n")
