"""The toy world: deterministic renders, round-tripping captions, an exact pixel checker, shards, toy VAE."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcmkit.toy.checker import attribute_accuracy, check, prompt_accuracy
from lcmkit.toy.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    Scene,
    all_scenes,
    make_splits,
    parse_caption,
    png_bytes,
    render,
    sample_scenes,
    sample_seed,
    write_shards,
)


def test_world_is_deterministic_for_a_seed():
    assert sample_scenes(50, seed=3) == sample_scenes(50, seed=3)
    assert sample_scenes(50, seed=3) != sample_scenes(50, seed=4)
    scene = Scene("triangle", "red", "top left", "small", "white")
    assert png_bytes(render(scene, seed=7)) == png_bytes(render(scene, seed=7))
    assert png_bytes(render(scene)) == png_bytes(render(scene))
    jittered = {png_bytes(render(scene, seed=s)) for s in range(10)}
    assert len(jittered) > 1
    assert render(scene).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_palette_is_separated_from_backgrounds():
    colours = np.array(list(COLOURS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=float)
    between = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert between[~np.eye(len(colours), dtype=bool)].min() > 90
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() > 150


def test_objects_stay_inside_the_frame():
    for scene in all_scenes():
        for seed in range(3):
            pixels = np.asarray(render(scene, seed=seed)).astype(int)
            background = np.array(BACKGROUNDS[scene.background])
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            # Nothing more than anti-aliased partial coverage ever reaches the outermost pixels.
            assert np.abs(border - background).max() < 255 * 0.75, scene


def test_captions_round_trip():
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 360
    for scene in scenes:
        assert parse_caption(scene.caption()) == scene
    assert Scene("circle", "red", "top left", "small", "white").caption() == (
        "a small red circle at the top left on a white background"
    )
    assert Scene("square", "blue", "center", "large", "black").caption() == (
        "a large blue square in the center on a black background"
    )
    assert parse_caption("  A large blue square in the center on a black background. ").colour == "blue"
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "center", "small", "white")


def test_checker_reads_rendered_images_exactly():
    scenes = sample_scenes(300, seed=11)
    images = [render(scene, seed=sample_seed(11, i)) for i, scene in enumerate(scenes)]
    assert [check(image) for image in images] == scenes
    prompts = [scene.caption() for scene in scenes]
    assert prompt_accuracy(images, prompts) == 1.0
    assert attribute_accuracy(images, prompts) == {name: 1.0 for name in ATTRIBUTES}
    # Arrays are read the same as images: uint8 HWC, float CHW in [0, 1].
    pixels = np.asarray(images[0])
    assert check(pixels) == scenes[0]
    assert check(pixels.transpose(2, 0, 1) / 255.0) == scenes[0]


def test_checker_rejects_blank_and_counts_wrong_attributes():
    blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS["white"])
    assert check(blank) is None
    scene = Scene("circle", "green", "bottom right", "large", "black")
    wrong = Scene("circle", "green", "bottom right", "large", "white").caption()
    assert prompt_accuracy([render(scene), blank], [wrong, wrong]) == 0.0
    accuracy = attribute_accuracy([render(scene)], [wrong])
    assert accuracy["background"] == 0.0 and accuracy["shape"] == 1.0


def test_shards_read_back_with_webdataset(tmp_path):
    import webdataset as wds

    paths = write_shards(tmp_path, n=25, seed=5, per_shard=10, prefix="train")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert len(samples) == 25
    for sample, scene in zip(samples, sample_scenes(25, seed=5)):
        caption = sample["txt"].decode("utf-8")
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        assert caption == scene.caption()
        assert parse_caption(caption) == Scene(*(meta[name] for name in ATTRIBUTES))
        assert meta["original_width"] == meta["original_height"] == IMAGE_SIZE
        assert check(image) == scene


def test_splits_use_different_seeds(tmp_path):
    splits = make_splits(tmp_path, n_train=20, n_test=10, seed=0, per_shard=100)
    assert len(splits["train"]) == len(splits["test"]) == 1
    import webdataset as wds

    train = [s["txt"] for s in wds.WebDataset(splits["train"], shardshuffle=False)]
    test = [s["txt"] for s in wds.WebDataset(splits["test"], shardshuffle=False)]
    assert len(train) == 20 and len(test) == 10
    assert train[:10] != test


def test_toy_vae_gives_16x16x4_latents():
    from lcmkit.toy.vae import build_toy_vae, to_tensor, to_uint8

    vae = build_toy_vae()
    assert sum(p.numel() for p in vae.parameters()) <= 1_500_000
    pixels = to_tensor(np.stack([np.asarray(render(s)) for s in sample_scenes(2, seed=0)]))
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        assert latents.shape == (2, 4, 16, 16)
        decoded = vae.decode(latents).sample
    assert decoded.shape == (2, 3, 32, 32)
    assert to_uint8(decoded).shape == (2, 32, 32, 3)
