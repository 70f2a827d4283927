"""Session-wide fixtures: tiny real-architecture teachers and tiny WebDataset shards (built once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import pytest  # noqa: E402
from tiny_models import make_shards, make_tiny_flux, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """SD 1.5-layout epsilon teacher folder."""
    return str(make_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "teacher"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    """SD 2.1-layout v_prediction teacher folder."""
    return str(make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v") / "teacher", prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """SDXL-layout teacher folder."""
    return str(make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "teacher"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    """SD3-layout teacher folder (MMDiT, CLIP-L + CLIP-G + T5, 16-channel VAE, shift 3)."""
    return str(make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "teacher"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    """FLUX.1-dev-layout teacher folder (guidance embedding, CLIP-L + T5, packed latents, dynamic shift)."""
    return str(make_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "teacher"))


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """Brace spec of 2 shards x 8 samples (jpg + txt + json)."""
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def tiny_sd_lora(tiny_sd, tmp_path_factory) -> str:
    """A built (untrained) LCM-LoRA folder for tiny_sd."""
    from tiny_models import make_tiny_lora

    return str(make_tiny_lora(tiny_sd, tmp_path_factory.mktemp("tiny-sd-lora")).parent)
