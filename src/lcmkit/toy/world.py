"""A deterministic synthetic captioned image world at 32x32 pixels (DESIGN.md section 5).

One object per scene: 3 shapes x 6 colours x 5 positions x 2 sizes x 2 backgrounds = 360 scenes.
Objects are drawn at 4x (128x128) and box-downsampled to 32x32, so edges are anti-aliased and the
fractional coverage of every pixel is exact. A seeded jitter of up to +-1 px (at 32 px) moves the object
off its anchor so that no two renders of a scene need be identical.

Geometry, in 32 px units: anchors at x, y in {10, 22} (corners) and (16, 16) (center); a small object
fills an 11x11 box and a large one a 17x17 box centred on the (jittered) anchor, so every object stays
inside the frame at every position. The checker (checker.py) reads all attributes back from pixels.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
TOY_GUIDANCE_SCALE = 5.0
"""The toy teacher's classifier-free guidance scale: what it was evaluated at and what its LCM-LoRA learned."""
SUPERSAMPLE = 4
MAX_JITTER = 1.0  # in 32 px units; drawn in whole 128 px pixels, i.e. quarter-pixel steps at 32 px

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Well-separated object colours (closest pair: yellow/orange, ~105 apart in RGB), none near white or black.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 128, 0),
    "yellow": (250, 230, 30),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Anchor of the object's box centre, (x, y) in 32 px units.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (10.0, 10.0),
    "top right": (22.0, 10.0),
    "bottom left": (10.0, 22.0),
    "bottom right": (22.0, 22.0),
    "center": (16.0, 16.0),
}
# Side of the object's bounding box in 32 px units.
SIZES: dict[str, float] = {"small": 11.0, "large": 17.0}

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position", "size", "background")


@dataclass(frozen=True)
class Scene:
    """One object on a plain background; every field is one of the world's attribute values."""

    shape: str
    colour: str
    position: str
    size: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("position", POSITIONS),
            ("size", SIZES),
            ("background", BACKGROUNDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {list(allowed)}")

    def caption(self) -> str:
        """E.g. 'a small red circle at the top left on a white background'."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"

    def to_dict(self) -> dict[str, str]:
        """The attributes as a plain dict (the json sidecar of a shard sample)."""
        return asdict(self)


def all_scenes() -> list[Scene]:
    """Every one of the 360 scenes, in a fixed order."""
    return [
        Scene(shape, colour, position, size, background)
        for background in BACKGROUNDS
        for size in SIZES
        for position in POSITIONS
        for colour in COLOURS
        for shape in SHAPES
    ]


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """`n` scenes with every attribute drawn uniformly and independently; deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    values = (SHAPES, list(COLOURS), list(POSITIONS), list(SIZES), list(BACKGROUNDS))
    picks = [rng.integers(0, len(options), size=n) for options in values]
    return [Scene(*(options[int(pick[i])] for options, pick in zip(values, picks))) for i in range(n)]


_CAPTION_RE = re.compile(
    r"^an? (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) "
    r"(?:at the (?P<position>top left|top right|bottom left|bottom right)|in the (?P<center>center|centre)) "
    r"on an? (?P<background>\w+) background\.?$"
)


def parse_caption(text: str) -> Scene:
    """Inverse of Scene.caption (case and surrounding whitespace are ignored); ValueError if not a caption."""
    match = _CAPTION_RE.match(" ".join(text.strip().lower().split()))
    if match is None:
        raise ValueError(f"not a caption of the toy world: {text!r}")
    position = "center" if match["center"] else match["position"]
    return Scene(match["shape"], match["colour"], position, match["size"], match["background"])


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], box: tuple[int, ...]):
    """Draw one filled shape into `box` = (x0, y0, x1, y1), inclusive pixel coordinates of the canvas."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        # Apex at the top centre, base along the bottom edge: fills half of its bounding box.
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def object_box(scene: Scene, jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float, float]:
    """The object's bounding box (x0, y0, x1, y1) in continuous 32 px units (x1, y1 exclusive)."""
    cx, cy = POSITIONS[scene.position]
    half = SIZES[scene.size] / 2
    return (cx + jitter[0] - half, cy + jitter[1] - half, cx + jitter[0] + half, cy + jitter[1] + half)


def _jitter(seed: int | Sequence[int] | None) -> tuple[float, float]:
    """Seeded jitter in whole supersampled pixels, returned in 32 px units; (0, 0) without a seed."""
    if seed is None:
        return 0.0, 0.0
    steps = int(MAX_JITTER * SUPERSAMPLE)
    jx, jy = np.random.default_rng(seed).integers(-steps, steps + 1, size=2)
    return float(jx) / SUPERSAMPLE, float(jy) / SUPERSAMPLE


def render(scene: Scene, seed: int | Sequence[int] | None = None) -> Image.Image:
    """Render `scene` as a 32x32 RGB image; deterministic, with a seeded +-1 px jitter if `seed` is given."""
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    x0, y0, x1, y1 = (round(v * SUPERSAMPLE) for v in object_box(scene, _jitter(seed)))
    _draw_object(ImageDraw.Draw(canvas), scene.shape, COLOURS[scene.colour], (x0, y0, x1 - 1, y1 - 1))
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_array(scenes: Sequence[Scene], seeds: Sequence[int | Sequence[int] | None] | None = None) -> np.ndarray:
    """Render many scenes into a uint8 array of shape (n, 32, 32, 3)."""
    seeds = [None] * len(scenes) if seeds is None else seeds
    return np.stack([np.asarray(render(scene, seed)) for scene, seed in zip(scenes, seeds, strict=True)])


def sample_seed(seed: int, index: int) -> int:
    """The jitter seed of sample `index` of a stream drawn with `seed` (independent across both)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def png_bytes(image: Image.Image) -> bytes:
    """Losslessly encoded PNG bytes of `image` (deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    out_dir: str | os.PathLike, n: int, seed: int, per_shard: int = 1000, prefix: str = "train"
) -> list[str]:
    """Write `n` rendered samples as WebDataset tar shards `{prefix}-00000.tar`, ...; returns their paths.

    Each sample has keys "png" (image bytes), "txt" (caption) and "json" (the attributes plus the
    original image size, as the SD data pipeline expects).
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(n, seed)
    paths: list[str] = []
    for shard_start in range(0, n, per_shard):
        path = out / f"{prefix}-{shard_start // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(shard_start, min(n, shard_start + per_shard)):
                scene = scenes[index]
                meta = {**scene.to_dict(), "original_width": IMAGE_SIZE, "original_height": IMAGE_SIZE}
                sink.write(
                    {
                        "__key__": f"{prefix}{index:08d}",
                        "png": png_bytes(render(scene, sample_seed(seed, index))),
                        "txt": scene.caption().encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8"),
                    }
                )
        paths.append(str(path))
    return paths


def make_splits(
    out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int, per_shard: int = 1000
) -> dict[str, list[str]]:
    """Write a train split and a held-out test split (drawn with a different seed) under `out_dir`.

    There are only 360 attribute combinations, so test scenes share combinations with train scenes;
    the renders differ through their jitter seeds.
    """
    test_seed = int(np.random.SeedSequence([seed, 0x7E57]).generate_state(1)[0])
    return {
        "train": write_shards(out_dir, n_train, seed, per_shard=per_shard, prefix="train"),
        "test": write_shards(out_dir, n_test, test_seed, per_shard=per_shard, prefix="test"),
    }
