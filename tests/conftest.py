"""Shared fixtures: a small random-weight model, sample photos, and the shared data folder."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from exemplar_desc.int8 import calibrate_int8
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
    card = {"architecture": arch.to_dict(), "patch_size": 32, "magnification": 12.0, "head": {"layer": net.layer, "grid": 4, "dim": 128},
            "int8": calibrate_int8(net, [patches])}
    return save_model(net, card, tmp_path_factory.mktemp("model"), "random-fast")


def write_quarter_photos(folder: Path) -> Path:
    """12 small photos in ``folder``: the quarters of three scikit-image photos at half size (75 x 112 to 128 x 128 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea"):
        image = cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR)
        h, w = image.shape[0] // 2, image.shape[1] // 2
        for i, (y, x) in enumerate(((0, 0), (0, w), (h, 0), (h, w))):
            quarter = cv2.resize(image[y : y + h, x : x + w], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(folder / f"{name}-{i}.png"), quarter)
    return folder


def save_small_model(folder: Path, name: str, collapsed: bool = False) -> Path:
    """Card path of a 'fast' network with random weights and a 16-D head on a 2 x 2 grid fitted on random patches
    (magnification 8), quick to fit again; ``collapsed``: its projection keeps one direction only, so every
    descriptor is the same up to sign and any fitted head describes better."""
    torch.manual_seed(0)
    arch = resolve_architecture("fast")
    net = DescriptorNet(arch, grid=2, dim=16, power=0.5).eval()
    with torch.no_grad():
        net.head.fit(net.head.pool(net.features(normalize_patches(torch.rand(512, 1, 32, 32)))))
        if collapsed:
            net.head.projection.zero_()
            net.head.projection[:, 0] = 1.0
    card = {"architecture": arch.to_dict(), "patch_size": 32, "magnification": 8.0,
            "head": {"layer": net.layer, "grid": 2, "dim": 16, "power": 0.5}}
    return save_model(net, card, folder, name)
