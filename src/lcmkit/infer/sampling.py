"""How a distilled model samples: the guidance defaults, TCD's gamma, the one conversion between the LCM paper's w
and diffusers' guidance_scale, and the sampling facts an LCM-LoRA carries in its own file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lcmkit.core.solver import guidance_scale as guidance_scale  # re-exported: the conversion lives in core
from lcmkit.core.solver import w_of as w_of
from lcmkit.families.base import Family
from lcmkit.methods.lcd import LCDSettings
from lcmkit.methods.tcd import TCD, phase_edges

FULL_LCM_GUIDANCE_SCALE = 8.5
"""A full LCM's guidance_scale when none is given: diffusers' LatentConsistencyModelPipeline default (w = 7.5)."""
LORA_GUIDANCE_SCALE = 1.0
"""An LCM-LoRA's guidance_scale: 1 runs no classifier-free guidance pass (the LoRA learned the guided ODE)."""
DEFAULT_TCD_GAMMA = TCD.eta
"""TCDScheduler's gamma (passed as eta) when none is given: the TCD paper's default (methods/tcd.py)."""
LCMSCHEDULER_DEFAULT_GRID = 50
"""diffusers' LCMScheduler original_inference_steps default: a model on another grid must say so."""
METADATA_PREFIX = "lcmkit."




def flow_sigmas(steps: int) -> list[float]:
    """The sigmas a flow model samples at in `steps` steps, before the scheduler's shift: 1, (N-1)/N, ..., 1/N, which
    the shift maps onto the spacing of the training grid. FluxPipeline passes these by default; StableDiffusion3Pipeline
    does not, and then (diffusers 0.42) FlowMatchLCMScheduler's own grid shifts twice: for 4 steps at shift 3 it is
    1, 0.858, 0.602, 0.009, so the last step starts from an almost clean latent and is wasted (docs/flow.md); and
    FlowMatchEulerDiscreteScheduler's runs from 1 to 1/1000: 2 Euler steps are 1 -> 0.001 -> 0, one step in effect.
    lcmkit samples both the distilled model and the teacher's Euler on these."""
    return [1.0 - i / steps for i in range(steps)]


def grid_sigmas(steps: int, num_ddim_timesteps: int) -> list[float]:
    """The sigmas (before the scheduler's shift) of a flow student's `steps` Euler steps on its N-point training
    grid: the grid points (N - floor(j N / steps)) / N, j < steps, which TCDScheduler visits for a UNet. They are a
    PCM student's phase edges, where it was trained to step from edge to edge."""
    edges = phase_edges(num_ddim_timesteps, min(steps, num_ddim_timesteps))
    return [float(i) / num_ddim_timesteps for i in edges.flip(0)[:-1].tolist()]


def default_guidance_scale(full: bool, family: Family | None = None) -> float:
    """A distilled model's guidance_scale when none is given. A guidance-distilled family (FLUX.1-dev): its guidance
    input. Another flow family (SD3): 1, no CFG pass (the student learned the guided ODE, and has no w input).
    A UNet: a full LCM's w input, or 1 for an LCM-LoRA."""
    if family is not None and family.guidance_distilled:
        return family.teacher_guidance  # its guidance input, at the family's usual value (FLUX: 3.5)
    if family is not None and family.flow:
        return LORA_GUIDANCE_SCALE
    return FULL_LCM_GUIDANCE_SCALE if full else LORA_GUIDANCE_SCALE


@dataclass(frozen=True)
class SamplingFacts:
    """What sampling a distilled LCM-LoRA must know of its training."""

    num_ddim_timesteps: int = LCDSettings.num_ddim_timesteps
    """N of the DDIM grid it was distilled on: LCMScheduler/TCDScheduler need original_inference_steps = N."""
    w_min: float | None = None
    """The trained guidance range (the LCM paper's w), when known."""
    w_max: float | None = None

    def metadata(self) -> dict[str, str]:
        """As safetensors metadata (strings)."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in asdict(self).items() if v is not None}


def sampling_facts(path: str | Path) -> SamplingFacts | None:
    """The sampling facts of an lcmkit LCM-LoRA (a file or its folder): from its safetensors metadata, or for a LoRA
    made before the file carried them from the run record beside it; None for any other LoRA."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    file = p / "pytorch_lora_weights.safetensors" if p.is_dir() else p
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        facts = {k.removeprefix(METADATA_PREFIX): json.loads(v) for k, v in meta.items()
                 if k.startswith(METADATA_PREFIX) and k.removeprefix(METADATA_PREFIX) in SamplingFacts.__annotations__}
    except Exception:  # not a readable safetensors file: it is checked (with a clear message) where it is loaded
        facts = {}
    if isinstance(facts.get("num_ddim_timesteps"), int) and facts["num_ddim_timesteps"] >= 1:
        return SamplingFacts(**facts)
    try:
        run = json.loads((file.parent / "lcmkit_run.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("mode") != "lora":
        return None
    lcd = run.get("config", {}).get("lcd", {})
    n = lcd.get("num_ddim_timesteps")
    if not (isinstance(n, int) and n >= 1):
        return None
    return SamplingFacts(n, lcd.get("w_min"), lcd.get("w_max"))


def full_lcm_ddim_timesteps(folder: str | Path) -> int:
    """N of a full student's grid, from the run record beside its pipeline/ (a distill output), else LCD's default
    (a full UNet LCM's scheduler config carries it as original_inference_steps too)."""
    p = Path(folder).expanduser()
    for record in (p / "lcmkit_run.json", p.parent / "lcmkit_run.json"):
        try:
            n = json.loads(record.read_text())["config"]["lcd"]["num_ddim_timesteps"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(n, int) and n >= 1:
            return n
    return SamplingFacts.num_ddim_timesteps


def lcm_lora_ddim_timesteps(loras: list[tuple[str, float]]) -> int:
    """N, the DDIM skipping grid an lcmkit LCM-LoRA among `loras` was distilled on, else LCD's default. Its
    consistency function is trained at those N timesteps only, so LCMScheduler and TCDScheduler must draw their
    steps from the same grid (original_inference_steps = N)."""
    for path, _ in loras:
        facts = sampling_facts(path)
        if facts is not None:
            return facts.num_ddim_timesteps
    return SamplingFacts.num_ddim_timesteps
