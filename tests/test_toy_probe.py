"""The toy probe: shipped weights load offline and read attributes; the Frechet distance is exact and moves right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcmkit.toy.checker import check
from lcmkit.toy.probe import (
    ASSET_DIR,
    CONFIG_NAME,
    REFERENCE_N,
    REFERENCE_NAME,
    REFERENCE_SEED,
    WEIGHTS_NAME,
    Probe,
    feature_stats,
    frechet_distance,
    images_to_tensor,
    load_probe,
    param_count,
    probe_fd,
    reference_stats,
    rendered_set,
    write_reference_stats,
)
from lcmkit.toy.world import ATTRIBUTES, Scene, render_array, sample_seed

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def probe() -> Probe:
    return load_probe()


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, list[Scene]]:
    return rendered_set(300, seed=4242)


def test_shipped_probe_is_small_and_documented(probe: Probe) -> None:
    assert (ASSET_DIR / WEIGHTS_NAME).stat().st_size < 1_000_000
    assert param_count(probe.net) < 200_000
    config = json.loads((ASSET_DIR / CONFIG_NAME).read_text())
    assert config["eval"]["n"] >= 2000
    assert min(config["eval"]["accuracy"][name] for name in ATTRIBUTES) >= 0.98
    assert load_probe() is probe  # cached
    assert not probe.net.training


def test_probe_accuracy_on_fresh_renders(probe: Probe, fresh: tuple[np.ndarray, list[Scene]]) -> None:
    images, scenes = fresh
    accuracy = probe.accuracy(images, scenes)
    assert all(accuracy[name] >= 0.98 for name in ATTRIBUTES), accuracy


def test_probe_agrees_with_checker(probe: Probe, fresh: tuple[np.ndarray, list[Scene]]) -> None:
    images, _ = fresh
    predicted = probe.predict(images)
    checked = [check(image) for image in images]
    agreement = np.mean([p == c for p, c in zip(predicted, checked)])
    assert agreement >= 0.98


def test_input_formats_agree(probe: Probe, fresh: tuple[np.ndarray, list[Scene]]) -> None:
    images = fresh[0][:16]
    reference = probe.features(images)
    assert reference.shape == (16, probe.feature_dim)
    pil = [Image.fromarray(image) for image in images]
    for variant in (pil, list(images), images.astype(np.float32) / 255.0, images.transpose(0, 3, 1, 2)):
        np.testing.assert_allclose(probe.features(variant), reference, rtol=1e-4, atol=1e-4)
    big = [image.resize((64, 64), Image.Resampling.NEAREST) for image in pil]  # area-resized back exactly
    np.testing.assert_allclose(probe.features(big), reference, rtol=1e-4, atol=1e-4)
    assert probe.predict(pil[:3]) == probe.predict(images[:3])
    x = images_to_tensor(images)
    assert x.shape == (16, 3, 32, 32) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_frechet_distance_self_is_zero() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = feature_stats(samples)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_equal_covariance_is_squared_mean_difference() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(12, 12))
    sigma = a @ a.T + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_diagonal_closed_form() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    s1[0] = 0.0  # singular covariance still works
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-8)
    # symmetric in its arguments; a scalar gaussian is (mu1 - mu2)^2 + (sd1 - sd2)^2
    assert frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])) == pytest.approx(
        2.0
    )
    with pytest.raises(ValueError):
        frechet_distance(mu1, np.diag(s1), mu2[:3], np.diag(s2)[:3, :3])


def _one_colour(scenes: list[Scene], colour: str) -> list[Scene]:
    """The same scenes with every object re-coloured `colour` (a colour-collapsed generator)."""
    return [Scene(s.shape, colour, s.position, s.size, s.background) for s in scenes]


def test_probe_fd_moves_the_right_way(probe: Probe) -> None:
    real_a, _ = rendered_set(500, seed=11)
    real_b, scenes_b = rendered_set(500, seed=12)
    wrong = render_array(_one_colour(scenes_b, "red"), [sample_seed(12, i) for i in range(500)])
    same = probe_fd(real_a, real_b, probe=probe)
    different = probe_fd(real_a, wrong, probe=probe)
    assert same >= 0.0
    assert different > 10 * same, (same, different)
    # the cached reference statistics are consistent with a direct computation
    mu, sigma = reference_stats(n=300, seed=5, probe=probe)
    assert reference_stats(n=300, seed=5, probe=probe)[0] is mu
    mu_direct, sigma_direct = feature_stats(probe.features(rendered_set(300, 5)[0]))
    np.testing.assert_allclose(mu, mu_direct)
    np.testing.assert_allclose(sigma, sigma_direct)


def test_shipped_reference_statistics_are_read_and_belong_to_the_shipped_probe(probe: Probe) -> None:
    from safetensors import safe_open

    with safe_open(str(ASSET_DIR / REFERENCE_NAME), framework="np") as f:
        meta, shipped_mu = f.metadata(), f.get_tensor("mu")
    assert meta["n"] == str(REFERENCE_N) == "50000" and meta["seed"] == str(REFERENCE_SEED)
    mu, sigma = reference_stats(probe=probe)  # read, not recomputed from 50,000 renders
    np.testing.assert_array_equal(mu, shipped_mu)
    # The first 2,000 of those renders agree with the 50,000 within sampling noise (5 standard errors per feature).
    mu_2k, _ = feature_stats(probe.features(rendered_set(2000, REFERENCE_SEED)[0]))
    standard_error = np.sqrt(np.diag(sigma) / 2000)
    assert np.all(np.abs(mu_2k - mu) < 5 * standard_error + 1e-9)


def test_written_reference_statistics_round_trip_and_are_dropped_for_other_weights(tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from lcmkit.toy.probe import _load_probe

    folder = tmp_path / "probe"
    folder.mkdir()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy(ASSET_DIR / name, folder / name)
    write_reference_stats(folder, n=200, seed=5)
    copy = load_probe(folder)
    mu, sigma = reference_stats(n=200, seed=5, probe=copy)
    mu_direct, sigma_direct = feature_stats(copy.features(rendered_set(200, 5)[0]))
    np.testing.assert_array_equal(mu, mu_direct)
    np.testing.assert_allclose(sigma, sigma_direct, rtol=0, atol=1e-12)
    # A retrained probe (other weights) must not use the old statistics.
    weights = load_file(str(folder / WEIGHTS_NAME))
    weights = {k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(folder / WEIGHTS_NAME))
    _load_probe.cache_clear()
    retrained = load_probe(folder)
    mu_new, _ = reference_stats(n=200, seed=5, probe=retrained)
    np.testing.assert_array_equal(mu_new, feature_stats(retrained.features(rendered_set(200, 5)[0]))[0])
    assert not np.allclose(mu_new, mu)
    _load_probe.cache_clear()
