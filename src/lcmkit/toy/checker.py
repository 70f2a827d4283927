"""A procedural pixel checker for the toy world: reads every scene attribute back from pixels alone.

Steps: background = nearest background colour to the median of the border pixels; object colour =
nearest palette colour to the median of the pixels far from the background; per-pixel coverage
(alpha) = projection of the pixel onto the background -> object colour segment, restricted to the
largest connected blob; soft row/column profiles give the bounding box; its centre -> nearest anchor
(position), its side -> size. Shape: a triangle (apex up) is the one shape whose centre of mass lies
below the centre of its box (by 1/6 of its height), which survives blur better than its fill ratio
(0.5); of the symmetric shapes, the fill ratio area / box area separates squares (1.0) from circles
(pi/4 = 0.785). Exact prompt accuracy of a generator needs no trained probe: compare check(image)
with parse_caption(prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from lcmkit.toy.world import ATTRIBUTES, BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SIZES, Scene, parse_caption

_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float64)
_ANCHORS = np.array(list(POSITIONS.values()), dtype=np.float64)
_SIZE_THRESHOLD = float(np.mean(list(SIZES.values())))  # side in px between small and large
# Centre of mass below the box centre, as a fraction of the height: triangle 1/6, others 0. Blurred
# reconstructions of small triangles measure ~0.1, hence a cut below half-way.
_TRIANGLE_MIN_SKEW = 0.06
# Fill ratio of the bounding box: circle pi/4 | square 1.0; cut half-way between.
_CIRCLE_MAX_FILL = (np.pi / 4 + 1.0) / 2
_MIN_OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as "object"
_MIN_OBJECT_PIXELS = 4


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float64 in 0..255 at 32x32; accepts PIL images, uint8 arrays, or floats in [0, 1]."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        return np.asarray(image, dtype=np.float64)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.max(initial=0.0) <= 1.0 + 1e-6:
            array = array * 255.0
        array = np.clip(array, 0.0, 255.0)
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        return _to_array(Image.fromarray(np.round(array).astype(np.uint8)))
    return array.astype(np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (grown by repeated 3x3 dilation)."""
    remaining = mask.copy()
    best = np.zeros_like(mask)
    while remaining.any():
        component = np.zeros_like(mask)
        component[np.unravel_index(np.argmax(remaining), mask.shape)] = True
        while True:
            grown = _dilate(component) & remaining
            if grown.sum() == component.sum():
                break
            component = grown
        remaining &= ~component
        if component.sum() > best.sum():
            best = component
    return best


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def measure(image: Image.Image | np.ndarray) -> dict[str, float] | None:
    """The raw measurements behind check(): colours, coverage area, soft box and fill ratio.

    Returns None where no object is visible.
    """
    pixels = _to_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = int(np.argmin(np.linalg.norm(_BACKGROUND_RGB - background_rgb, axis=1)))

    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    far = distance > _MIN_OBJECT_DISTANCE
    if far.sum() < _MIN_OBJECT_PIXELS:
        return None
    # The object's own colour: median of its core (the pixels farthest from the background).
    core = far & (distance >= 0.75 * distance[far].max())
    object_rgb = np.median(pixels[core], axis=0)
    colour = int(np.argmin(np.linalg.norm(_COLOUR_RGB - object_rgb, axis=1)))

    # Coverage of each pixel by the object, exact for box-downsampled anti-aliased edges.
    direction = object_rgb - background_rgb
    alpha = np.clip((pixels - background_rgb) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    blob = _largest_component(alpha > 0.5)
    if blob.sum() < _MIN_OBJECT_PIXELS:
        return None
    alpha = np.where(_dilate(blob), alpha, 0.0)
    alpha = np.where(alpha > 0.1, alpha, 0.0)  # drop faint noise away from the edges

    # Soft extent: the sum of each column's (row's) largest coverage is the width (height) of the box.
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    width, height = float(cols.sum()), float(rows.sum())
    centre_x = float((cols * (np.arange(cols.size) + 0.5)).sum() / width)
    centre_y = float((rows * (np.arange(rows.size) + 0.5)).sum() / height)
    area = float(alpha.sum())
    # A triangle (apex up) holds 2/3 of its mass in the lower half: its centre of mass sits below the
    # centre of its box by 1/6 of its height; circles and squares are symmetric.
    mass_y = float((alpha.sum(axis=1) * (np.arange(rows.size) + 0.5)).sum() / max(area, 1e-6))
    return {
        "background": float(background),
        "colour": float(colour),
        "centre_x": centre_x,
        "centre_y": centre_y,
        "width": width,
        "height": height,
        "side": float(np.sqrt(width * height)),
        "area": area,
        "fill": area / max(width * height, 1e-6),
        "skew": (mass_y - centre_y) / max(height, 1e-6),
        "colour_error": float(np.linalg.norm(_COLOUR_RGB[colour] - object_rgb)),
    }


def check(image: Image.Image | np.ndarray) -> Scene | None:
    """The scene an image shows, read from pixels alone; None where no object is found."""
    m = measure(image)
    if m is None:
        return None
    if m["skew"] > _TRIANGLE_MIN_SKEW and m["fill"] < _CIRCLE_MAX_FILL:
        shape = "triangle"
    elif m["fill"] < _CIRCLE_MAX_FILL:
        shape = "circle"
    else:
        shape = "square"
    position = int(np.argmin(np.linalg.norm(_ANCHORS - [m["centre_x"], m["centre_y"]], axis=1)))
    return Scene(
        shape=shape,
        colour=list(COLOURS)[int(m["colour"])],
        position=list(POSITIONS)[position],
        size="large" if m["side"] > _SIZE_THRESHOLD else "small",
        background=list(BACKGROUNDS)[int(m["background"])],
    )


def _readings(images: Sequence, prompts: Sequence[str]) -> list[tuple[Scene, Scene | None]]:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return [(parse_caption(prompt), check(image)) for image, prompt in zip(images, prompts)]


def prompt_accuracy(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> float:
    """Fraction of images whose checker reading matches their prompt in every attribute."""
    readings = _readings(images, prompts)
    return sum(want == got for want, got in readings) / max(len(readings), 1)


def attribute_accuracy(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute fraction of images whose checker reading matches the prompt (no object: all wrong)."""
    readings = _readings(images, prompts)
    n = max(len(readings), 1)
    return {
        name: sum(got is not None and getattr(got, name) == getattr(want, name) for want, got in readings) / n
        for name in ATTRIBUTES
    }
