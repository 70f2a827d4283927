"""The only place that knows a model family: loading, conditioning, the denoiser call, the student, the pipelines
and file layouts. One module per family (sd.py, sdxl.py, sd3.py, flux.py) and this registry."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lcmkit.errors import ConfigError
from lcmkit.families.base import Family
from lcmkit.families.flux import FLUX
from lcmkit.families.sd import SD
from lcmkit.families.sd3 import SD3
from lcmkit.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL, SD3, FLUX)}
"""name -> family. A new family is one module and one entry here."""


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_components(names: Iterable[str], class_name: str = "") -> Family | None:
    """The family of a pipeline from its class name (a family's pipeline class), else from the components it
    holds (model_index.json entries or attributes): the family with its denoiser and the most of its text encoders
    present, fewest missing first; or None."""
    for family in FAMILIES.values():
        if class_name and class_name in (family.pipeline, family.lcm_pipeline):
            return family
    present = set(names)
    fits = [f for f in FAMILIES.values() if f.denoiser in present and f.text_encoders[0] in present]
    return max(fits, key=lambda f: (len(set(f.text_encoders) & present), -len(f.text_encoders)), default=None)


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline."""
    family = family_of_components([n for n in pipe.components if pipe.components[n] is not None], type(pipe).__name__)
    if family is None:
        raise ConfigError(f"{type(pipe).__name__} holds no text encoder lcmkit knows: not a {families_text()} model")
    return family


def family_of_keys(keys: Iterable[str]) -> Family:
    """The family of a single-file checkpoint from its keys (a family's marker prefix, else SD's LDM layout)."""
    keys = list(keys)
    for family in FAMILIES.values():
        if any(k.startswith(family.single_file_markers) for k in keys if family.single_file_markers):
            return family
    return FAMILIES["sd"]


def family_of_unet_config(config: Mapping[str, Any]) -> tuple[Family, str]:
    """(family, version) of a UNet config: the family whose config marker it has, and the version its
    cross-attention width tells (e.g. SD 1.x vs 2.x)."""
    marked = [f for f in FAMILIES.values() if f.unet_marker and f.unet_marker.items() <= dict(config).items()]
    family = marked[0] if marked else FAMILIES["sd"]
    width = config.get("cross_attention_dim")
    return family, family.cross_attention.get(width, "") if isinstance(width, int) else ""


def families_text() -> str:
    return "/".join(f.label for f in FAMILIES.values())


def family_of_cross_attention(width: int) -> str | None:
    """'sd (1.x)', 'sdxl', ...: the family (and version) whose UNets cross-attend to text of this width."""
    for family in FAMILIES.values():
        if width in family.cross_attention:
            version = family.cross_attention[width]
            return f"{family.name} ({version})" if version else family.name
    return None
