"""docs/guide.md cannot rot: every fenced block is either run here, against the tiny teachers, or marked as not
tested with a reason.

Markers (an HTML comment on the line just above the opening fence; see the maintainer note in the guide):
`test`, `test creates: PATH ...`, `test file: NAME`, `not tested: REASON`. Tested blocks run in order in one
temporary folder, after SUBSTITUTIONS (real model ids and sizes -> tiny ones) and with CPU-sized settings
added to distill and cache commands. `lcmkit ...` lines run in-process (fast), other shell lines with bash
(accelerate launch: two CPU processes joined by gloo), python blocks with exec.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lcmkit.app.cli import main

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "guide.md"

MARKER = re.compile(
    r"^<!--\s*(?:(?P<test>test)(?:\s+creates:\s*(?P<creates>.*?))?|test file:\s*(?P<file>\S+)"
    r"|not tested:\s*(?P<reason>\S.*?))\s*-->$"
)
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")

# Real model ids -> tiny teachers, GPU-only settings -> CPU ones. `{sd}` etc. are filled in from the fixtures.
SUBSTITUTIONS = [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "{sd}"),
    ("runwayml/stable-diffusion-v1-5", "{sd}"),
    ("stabilityai/stable-diffusion-2-1", "{sd_v}"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "{sdxl}"),
    ("madebyollin/sdxl-vae-fp16-fix", "{sdxl}/vae"),
    ("my-style.safetensors", "sd15-lcm-lora-kohya.safetensors"),  # any LoRA of the base stands in for a style
    ("torch.float16", "torch.float32"),
    ('.to("cuda")', '.to("cpu")'),
    ("num_processes: 8", "num_processes: 2"),
]
# Flag (and TOML key) values: value in the guide -> value here. A value missing here fails the test, so
# that a new command gets a deliberate CPU size.
SIZES = {
    "resolution": {"512": "64", "768": "64", "1024": "64"},
    "batch-size": {"8": "2", "4": "2"},
    "max-steps": {"4000": "2", "8000": "3"},  # 8000: a resumed run goes one step further
    "num-workers": {"8": "0", "4": "0"},
    "checkpoint-every": {"500": "1"},
    "validation-every": {"500": "2"},
    "steps": {"20": "3", "4": "4"},  # bench distill needs >= 3; generate keeps 4
    "teacher-steps": {"25": "4"},
}
# Added to commands that do not give them (a preset's fp16 and 512-1024 px do not fit a CPU).
CPU_SETTINGS = {
    "distill": "--mixed-precision no --resolution 64 --batch-size 2 --max-steps 2 --lora-rank 4 --checkpoint-every 1 "
    "--no-progress".split(),
    "cache": "--resolution 64 --no-progress".split(),
    "bench generate": "--repeats 1 --warmup 1".split(),
}


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    action: str  # test, file, skip
    creates: list[str] = field(default_factory=list)
    file: str = ""
    reason: str = ""


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block with its marker; raises AssertionError naming a block without one."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"guide.md line {i + 1}: unclosed code fence"
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        assert marker, (
            f"guide.md line {i + 1}: fenced block without a marker on the line above "
            "(<!-- test -->, <!-- test creates: ... -->, <!-- test file: NAME -->, or <!-- not tested: REASON -->)"
        )
        body = "\n".join(lines[i + 1 : end]) + "\n"
        if marker["test"]:
            action = "test"
        elif marker["file"]:
            action = "file"
        else:
            action = "skip"
        blocks.append(Block(i + 1, fence["lang"], body, action, (marker["creates"] or "").split(), marker["file"] or "",
                            marker["reason"] or ""))  # fmt: skip
        i = end + 1
    return blocks


def substitute(text: str, tiny: dict[str, str]) -> str:
    for real, stand_in in SUBSTITUTIONS:
        if real in text:
            text = text.replace(real, stand_in.format(**tiny))

    def size(match: re.Match) -> str:
        flag, sep, value = match.group(1), match.group(2), match.group(3)
        name = flag.lstrip("-").replace("_", "-")
        assert value in SIZES[name], f"no CPU size for {flag} {value}: add it to SIZES in tests/test_docs.py"
        return f"{flag}{sep}{SIZES[name][value]}"

    flags = "|".join(re.escape(f) for f in SIZES)
    text = re.sub(rf"(--(?:{flags}))(\s+)(\d+)\b", size, text)
    keys = "|".join(re.escape(f.replace("-", "_")) for f in SIZES)
    return re.sub(rf"^((?:{keys}))(\s*=\s*)(\d+)\b", size, text, flags=re.M)


def commands(body: str) -> list[str]:
    """Shell lines, continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def with_cpu_settings(argv: list[str], tiny: dict[str, str] | None = None) -> list[str]:
    """Add CPU_SETTINGS after `lcmkit distill|cache|bench generate` (also inside accelerate launch ... -m lcmkit),
    and the tiny VAE where an SDXL preset names the real fp16-fix one."""
    for i, word in enumerate(argv):
        if word != "lcmkit" or i + 1 >= len(argv):
            continue
        sub = " ".join(argv[i + 1 : i + 3]) if argv[i + 1] == "bench" else argv[i + 1]
        extra = CPU_SETTINGS.get(sub, [])
        added: list[str] = []
        for j, token in enumerate(extra):
            if token.startswith("--") and token not in argv:
                value = extra[j + 1] if j + 1 < len(extra) and not extra[j + 1].startswith("--") else None
                added += [token] + ([value] if value is not None else [])
        preset = argv[argv.index("--preset") + 1] if "--preset" in argv else ""
        if preset.startswith("sdxl") and "--vae" not in argv and tiny:
            added += ["--vae", f"{tiny['sdxl']}/vae"]
        return argv + added
    return argv


def run_shell(line: str, env: dict[str, str], tiny: dict[str, str], monkeypatch) -> None:
    argv = shlex.split(line, comments=True)
    assignments = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        assignments[name] = value
    argv = with_cpu_settings(argv, tiny)
    if argv[0] == "lcmkit":
        with monkeypatch.context() as m:
            for name, value in assignments.items():
                m.setenv(name, value)
            code = main(argv[1:])
        assert code == 0, f"exit code {code}: {shlex.join(argv)}"
        return
    done = subprocess.run(["bash", "-c", shlex.join(argv)], env={**env, **assignments}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    errors = [x for x in done.stderr.splitlines() if "lcmkit: error" in x or "Error" in x]
    assert done.returncode == 0, f"exit code {done.returncode}: {shlex.join(argv)}\n" + "\n".join(errors[-5:])


def make_photos(folder: Path, n: int = 8) -> None:
    """The guide's starting point: images with a .txt caption of the same name."""
    from PIL import Image

    folder.mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for i in range(n):
        colour = colours[i % len(colours)]
        Image.new("RGB", (80, 64), colour).save(folder / f"photo{i}.jpg")
        (folder / f"photo{i}.txt").write_text(f"a {colour} square, photo {i}\n")


def test_every_block_is_tested_or_marked():
    blocks = parse_blocks(GUIDE.read_text())
    assert len(blocks) >= 20
    for b in blocks:
        assert b.lang in ("sh", "python", "toml", "yaml"), f"guide.md line {b.line}: unexpected language {b.lang!r}"
        assert b.action != "file" or b.lang in ("toml", "yaml"), f"guide.md line {b.line}: only config files"
        assert b.action != "skip" or len(b.reason) > 10, f"guide.md line {b.line}: say why it is not tested"
    assert sum(b.action == "skip" for b in blocks) <= 4, "keep the untested blocks few"


def test_marker_and_substitution_rules():
    text = "x\n<!-- test creates: a b -->\n```sh\nlcmkit distill --resolution 1024 \\\n  --max-steps 8000 # c\n```\n"
    [b] = parse_blocks(text)
    assert (b.action, b.creates, b.line) == ("test", ["a", "b"], 3)
    cmd = commands(substitute(b.body, {}))
    assert cmd == ["lcmkit distill --resolution 64 --max-steps 3 # c"]
    argv = with_cpu_settings(shlex.split(cmd[0], comments=True))
    assert argv[argv.index("--max-steps") + 1] == "3" and argv.count("--max-steps") == 1 and "--lora-rank" in argv
    assert substitute("max_steps = 4000\nbatch_size = 8\n", {}) == "max_steps = 2\nbatch_size = 2\n"
    with pytest.raises(AssertionError, match="no CPU size for --resolution 333"):
        substitute("--resolution 333", {})
    with pytest.raises(AssertionError, match="line 2: fenced block without a marker"):
        parse_blocks("<!-- a comment -->\n```sh\nlcmkit info x\n```\n")


def test_guide_runs(tiny_sd, tiny_sd_v, tiny_sdxl, tmp_path, monkeypatch):
    tiny = {"sd": tiny_sd, "sd_v": tiny_sd_v, "sdxl": tiny_sdxl}
    work = tmp_path / "guide"
    work.mkdir()
    monkeypatch.chdir(work)
    make_photos(work / "photos")
    # The offline section distills a single-file fine-tune: the tiny teacher in the original SD layout.
    assert main(["export", "single-file", tiny_sd, "--out", "my-finetune.safetensors", "--dtype", "fp32"]) == 0
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
        "ACCELERATE_USE_CPU": "1",  # accelerate launch --multi_gpu / MULTI_GPU config: a gloo group of CPU processes
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    timings = []
    for b in parse_blocks(GUIDE.read_text()):
        if b.action == "skip":
            continue
        body = substitute(b.body, tiny)
        t0 = time.perf_counter()
        if b.action == "file":
            Path(b.file).write_text(body)
        elif b.lang == "python":
            exec(compile(body, f"{GUIDE}:{b.line}", "exec"), {"__name__": "__guide__"})
        else:
            for line in commands(body):
                run_shell(line, env, tiny, monkeypatch)
        timings.append((time.perf_counter() - t0, b.line))
        missing = [p for p in b.creates if not Path(p).exists()]
        assert not missing, f"guide.md line {b.line}: the block promises {missing}, not there"
    print("slowest blocks (s, line):", sorted(timings, reverse=True)[:5])

    # The resumed run went on from the checkpoint of the first one: 2 steps, then 1 more.
    import json

    record = json.loads((work / "runs/sd15-lcm-lora/lcmkit_run.json").read_text())
    assert record["steps"] == 3
    assert json.loads((work / "runs/sdxl-lcm-lora/lcmkit_run.json").read_text())["num_processes"] == 2
    assert json.loads((work / "runs/sd21-lcm-lora/lcmkit_run.json").read_text())["prediction_type"] == "v_prediction"
