"""The only place that knows a model family: loading, conditioning, the denoiser call, the student, the pipelines
and file layouts. One module per family (sd.py, sdxl.py) and this registry."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lcmkit.errors import ConfigError
from lcmkit.families.base import Family
from lcmkit.families.sd import SD
from lcmkit.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL)}
"""name -> family. A new family is one module and one entry here."""


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_components(names: Iterable[str]) -> Family | None:
    """The family whose text encoders a pipeline (its model_index.json entries or attributes) holds: the one with
    the most of them present, or None."""
    present = set(names)
    fits = [f for f in FAMILIES.values() if set(f.text_encoders) <= present]
    return max(fits, key=lambda f: len(f.text_encoders), default=None)


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline."""
    family = family_of_components(name for name in pipe.components if pipe.components[name] is not None)
    if family is None:
        raise ConfigError(f"{type(pipe).__name__} holds no text encoder lcmkit knows: not a {families_text()} model")
    return family


def family_of_keys(keys: Iterable[str]) -> Family:
    """The family of a single-file checkpoint from its keys (a family's marker prefix, else SD's LDM layout)."""
    keys = list(keys)
    for family in FAMILIES.values():
        if family.single_file_marker and any(k.startswith(family.single_file_marker) for k in keys):
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
