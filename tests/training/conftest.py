"""Fixtures of the training tests: folders of scikit-image's photos to train on."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import pytest
import skimage.data

#: scikit-image's colour photos the folders hold, in this order.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _photo_folder(folder: Path, names: Sequence[str]) -> Path:
    """``folder`` with scikit-image's RGB photos ``names`` written into it as ``<name>.png`` (BGR for OpenCV)."""
    for name in names:
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three photos: astronaut, coffee and chelsea."""
    return _photo_folder(tmp_path_factory.mktemp("photos"), PHOTOS[:3])


@pytest.fixture(scope="module")
def folder_of_four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of four photos: those of :func:`folder` and rocket."""
    return _photo_folder(tmp_path_factory.mktemp("photos"), PHOTOS)
