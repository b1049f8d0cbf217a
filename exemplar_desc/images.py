"""Finding and reading image files: one lister for training, extraction and SfM.

Images are named by their path relative to the image folder, with ``/`` separators
(hloc's and COLMAP's convention). They are read as 8-bit grey (or BGR) arrays without applying the
EXIF orientation, so pixel coordinates refer to the stored raster, as COLMAP's cameras do.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "list_images", "gather_images", "read_image_bytes", "decode_gray",
           "decode_bgr", "resize_to_max"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded completely (corrupt, truncated or not an image)."""


def list_images(image_dir: str | Path) -> list[str]:
    """Image files under ``image_dir`` (recursively), by extension, case-insensitive.

    Returns:
        Sorted paths relative to ``image_dir`` with ``/`` separators (e.g. ``"a/01.jpg"``).

    Raises:
        FileNotFoundError: ``image_dir`` is missing or not a folder.
        ValueError: it holds no file with an image extension.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not names:
        raise ValueError(
            f"no images in {str(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)"
        )
    return names


def gather_images(entries: Sequence[str | Path]) -> list[Path]:
    """The image files that folders (searched recursively) and image files name, in the entries' order.

    Args:
        entries: folders, whose images come in :func:`list_images`' order, and image files
            (by extension, case-insensitive), taken as they are.

    Returns:
        ``folder / name`` for each image of a folder, and each file as given.

    Raises:
        FileNotFoundError: an entry that is neither a folder nor a file.
        ValueError: a folder without images, or a file without an image extension.
    """
    paths: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_file():
            if entry.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{str(entry)!r} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            paths.append(entry)
        elif entry.is_dir():
            paths += [entry / name for name in list_images(entry)]
        else:
            raise FileNotFoundError(f"{str(entry)!r} is neither an image folder nor an image file")
    return paths


def read_image_bytes(path: str | Path) -> tuple[bytes, str]:
    """Read a file and fingerprint it.

    Returns:
        The file's bytes and their SHA-1 hex digest (used to tell unchanged images apart).
    """
    data = Path(path).read_bytes()
    return data, hashlib.sha1(data).hexdigest()


def _is_truncated_jpeg(data: bytes) -> bool:
    # libjpeg decodes a truncated stream with a warning and grey fill instead of failing,
    # so check for the end-of-image marker (0xFFD9); some writers pad with zero bytes.
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _decode(data: bytes, name: str, flags: int) -> np.ndarray:
    if _is_truncated_jpeg(data):
        raise UnreadableImageError(f"{name}: truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, flags | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if image is None or image.size == 0:
        raise UnreadableImageError(f"{name}: not a readable image (empty, corrupt or truncated)")
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    return image


def decode_gray(data: bytes, name: str = "image") -> np.ndarray:
    """Decode an encoded image file to grey, ignoring its EXIF orientation.

    Args:
        data: the file's bytes.
        name: what to call the image in error messages.

    Returns:
        (H, W) uint8 array.

    Raises:
        UnreadableImageError: not decodable by OpenCV, or a JPEG without its end marker.
    """
    return _decode(data, name, cv2.IMREAD_GRAYSCALE)


def decode_bgr(data: bytes, name: str = "image") -> np.ndarray:
    """Decode an encoded image file to colour, ignoring its EXIF orientation (grey files are
    repeated into the three channels).

    Returns:
        (H, W, 3) uint8 array, BGR (OpenCV's channel order).

    Raises:
        UnreadableImageError: as :func:`decode_gray`.
    """
    return _decode(data, name, cv2.IMREAD_COLOR)


def resize_to_max(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Downscale so the longer side is at most ``max_size`` pixels (area interpolation).

    Returns:
        The image and ``scale``, a (2,) float64 array of processed pixels per original
        pixel along (x, y) (ones when not resized). A processed pixel-centre coordinate
        ``p`` maps to ``(p + 0.5) / scale - 0.5`` in the original image (pixel centres at
        integer coordinates).
    """
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image, np.ones(2)
    factor = max_size / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    # The exact per-axis factors implied by the rounded size.
    return resized, np.array([size[0] / w, size[1] / h])
