"""Shared fixtures: a small random-weight model, sample photos, and the shared data folder."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from exemplar_desc.model_io import save_model
from exemplar_desc.networks import DescriptorNet, resolve_architecture
from exemplar_desc.patches import normalize_patches

@pytest.fixture(autouse=True)
def _seeded_global_generators():
    """Seed the global generators before each test, so that no draw depends on test order or machine."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder lies beside the repository in CI)")
    return path


@pytest.fixture(scope="session")
def photo_bgr() -> np.ndarray:
    """(512, 512, 3) uint8 BGR photo shipped with scikit-image."""
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """Card path of a 'fast' descriptor with random weights and a PCA fitted on random patches."""
    torch.manual_seed(0)
    arch = resolve_architecture("fast")
    net = DescriptorNet(arch).eval()
    with torch.no_grad():
        patches = normalize_patches(torch.rand(512, 1, 32, 32))
        net.head.fit(net.head.pool(net.features(patches)))
    card = {"architecture": arch.to_dict(), "patch_size": 32, "magnification": 12.0, "head": {"layer": net.layer, "grid": 4, "dim": 128}}
    return save_model(net, card, tmp_path_factory.mktemp("model"), "random-fast")
