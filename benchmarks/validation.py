"""Held-out validation sequences with exact homographies, made from training photos that are never seeds.

Model choices (architecture, training settings, magnification...) are made on these
sequences, not on the Oxford sequences or the synthetic check of
:mod:`benchmarks.synthetic`, so that those stay unbiased. The photos are the folders
:data:`HELD_OUT_FOLDERS` of the training-photo root (``kodak24``: 24 photos, ``mcmaster``:
18); models trained for a choice draw their seeds from the other folders only.

Each photo is image 1 of one sequence; images 2..6 show one kind of change of increasing
strength, the kinds taken in turn over the sorted photo list (7 photos per kind):

* ``viewpoint``: the photo as a plane tilted by 10..60 degrees about a random in-plane
  axis, seen by a pinhole camera, with a random in-plane rotation (+-10 degrees) and scale
  (0.9..1.1);
* ``zoom+rotation``: zoom 1.2..2.5 about the centre and rotation 10..60 degrees, one random
  direction per sequence;
* ``light``: exposure (-0.5..-2.5 stops, or +0.3..+1.5 with probability 0.4), gamma (up to x/÷ 1.5), colour
  temperature (red/blue gain ratio up to e^+-0.6), smooth shading (a random quadratic plus
  a Gaussian blob, up to e^+-0.7) and 1..3 soft-edged polygonal cast shadows darkening by
  30-70%, in linear light;
* ``noise``: Poisson-Gaussian sensor noise in linear light, full-well 600..20 electrons at
  white and read noise 0.002..0.03 of white;
* ``JPEG``: JPEG quality 50..5;
* ``blur``: Gaussian (sigma 0.8..3.6 px), defocus (disc radius 1.5..6 px) or both
  (0.7 times each), in linear light.

The photometric kinds also move the camera slightly, as the synthetic ones do
(:func:`benchmarks.synthetic._camera_shake`). Every image 2..6 gets weak sensor noise
(full-well 3000, read noise 0.001; the ``noise`` kind its own). Images are BGR uint8 at
the photo's size. Everything is drawn from a generator seeded by the photo's name, so the
sequences are the same bytes on every run; they are written in the Oxford layout under a
cache folder named by the generator version and the photos' content, and read back by
:func:`benchmarks.datasets.load_sequences`.

The generator takes any photos (:func:`ensure_sequences`, given the photos and their
kinds): the adaptation command (:mod:`exemplar_desc.adapt`) measures its gain on sequences
made this way from the user's held-out photos.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from exemplar_desc.images import decode_bgr, list_images, read_image_bytes, resize_to_max

from .datasets import load_sequences, write_sequence
from .synthetic import _about_centre, _camera_shake, _similarity, _viewpoint, _warp

logger = logging.getLogger(__name__)

__all__ = ["HELD_OUT_FOLDERS", "VALIDATION_KINDS", "held_out_photos", "sequence_name", "make_validation_sequence",
           "kinds_in_turn", "ensure_sequences", "ensure_validation_dataset"]

HELD_OUT_FOLDERS = ("kodak24", "mcmaster")
VALIDATION_KINDS = ("viewpoint", "zoom+rotation", "light", "noise", "JPEG", "blur")
# The word each kind puts in its sequence folder names (benchmarks.datasets.sequence_kind reads it back).
_KIND_WORDS = {"viewpoint": "viewpoint", "zoom+rotation": "zoom-rotation", "light": "light", "noise": "noise",
               "JPEG": "jpeg", "blur": "blur"}
_VERSION = "validation-v1"  # bump when the generator changes, so old caches are not reused
_NUM_IMAGES = 6
_BASE_NOISE = (3000.0, 0.001)  # (full-well electrons at white, read noise as a fraction of white)
_NOISE_LEVELS = [(600.0, 0.002), (250.0, 0.004), (100.0, 0.008), (45.0, 0.016), (20.0, 0.03)]
_JPEG_QUALITIES = [50, 35, 20, 10, 5]
_BLUR_SIGMAS = [0.8, 1.4, 2.0, 2.8, 3.6]
_DEFOCUS_RADII = [1.5, 2.5, 3.5, 4.5, 6.0]
_ZOOMS = [1.2, 1.45, 1.75, 2.1, 2.5]


def held_out_photos(train_root: str | Path) -> list[str]:
    """The held-out photos of a training-photo root.

    Returns:
        Sorted paths relative to ``train_root`` with ``/`` separators (``"kodak24/kodim01.jpg"``),
        from the folders :data:`HELD_OUT_FOLDERS` only.

    Raises:
        FileNotFoundError: a held-out folder is missing.
        ValueError: a held-out folder holds no image.
    """
    root = Path(train_root)
    names = []
    for folder in HELD_OUT_FOLDERS:
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"{root} lacks the held-out photo folder {folder!r} "
                                    f"(expected {', '.join(HELD_OUT_FOLDERS)})")
        names += [f"{folder}/{name}" for name in list_images(root / folder)]
    return sorted(names)


def sequence_name(photo: str, kind: str) -> str:
    """Sequence folder name of a held-out photo (``"kodak24/kodim01.jpg"``, ``"blur"`` ->
    ``"kodak24-kodim01-blur"``); it holds the kind's word, see :func:`benchmarks.datasets.sequence_kind`."""
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(photo).with_suffix("").as_posix().replace("/", "-"))
    return f"{stem}-{_KIND_WORDS[kind]}"


def _to_linear(image: np.ndarray) -> np.ndarray:
    """sRGB uint8 -> linear light float32 in [0, 1] (the sRGB transfer function)."""
    x = image.astype(np.float32) / 255.0
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light (clipped to [0, 1]) -> sRGB uint8."""
    x = np.clip(linear, 0.0, 1.0)
    x = np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(255.0 * x), 0, 255).astype(np.uint8)


def _sensor_noise(linear: np.ndarray, full_well: float, read_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise (Poisson in ``full_well`` electrons at white) plus Gaussian read noise."""
    electrons = rng.poisson(np.clip(linear, 0.0, None) * full_well).astype(np.float32)
    return electrons / full_well + rng.normal(0.0, read_noise, linear.shape).astype(np.float32)


def _shading(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field exp(strength * s), s in [-1, 1]: a random quadratic plus a Gaussian blob."""
    h, w = shape
    v, u = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    c = rng.normal(size=6)
    field = c[0] * u + c[1] * v + c[2] * u * u + c[3] * v * v + c[4] * u * v
    centre, sigma = rng.uniform(-1, 1, 2), rng.uniform(0.3, 0.7)
    field += 2.0 * c[5] * np.exp(-((u - centre[0]) ** 2 + (v - centre[1]) ** 2) / (2 * sigma**2))
    field -= field.mean()
    field /= max(np.abs(field).max(), 1e-6)
    return np.exp(strength * field).astype(np.float32)


def _shadows(shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative field of ``count`` soft-edged random polygons, each darkening by 30-70%."""
    h, w = shape
    field = np.ones(shape, np.float32)
    for _ in range(count):
        centre = rng.uniform([0, 0], [w, h])
        radius = rng.uniform(0.1, 0.3) * min(h, w)
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 8)))
        radii = radius * rng.uniform(0.5, 1.0, len(angles))
        polygon = centre + np.c_[radii * np.cos(angles), radii * np.sin(angles)]
        mask = np.zeros(shape, np.float32)
        cv2.fillPoly(mask, [np.rint(polygon * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
        mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(2.0, 12.0))  # penumbra
        field *= 1.0 - rng.uniform(0.3, 0.7) * mask
    return field


def _disc_kernel(radius: float) -> np.ndarray:
    """Normalised defocus kernel: the area of each pixel inside a disc of ``radius`` px (8x8 subpixels)."""
    n, s = int(np.ceil(radius)), 8
    x = (np.arange((2 * n + 1) * s) + 0.5) / s - (n + 0.5)
    inside = (x[None, :] ** 2 + x[:, None] ** 2 <= radius**2).astype(np.float32)
    kernel = inside.reshape(2 * n + 1, s, 2 * n + 1, s).mean(axis=(1, 3))
    return kernel / kernel.sum()


def make_validation_sequence(image: np.ndarray, kind: str, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Transform a photo into a six-image sequence of the given kind (see the module docstring).

    Args:
        image: uint8 (H, W, 3) BGR image 1.
        kind: one of :data:`VALIDATION_KINDS`.
        seed: seed of every random draw.

    Returns:
        Six uint8 (H, W, 3) BGR images, and six (3, 3) float64 homographies from image 1 to
        image k (the first is the identity); ``cv2.warpPerspective`` with ``H_k`` moves image 1
        onto image k (pixel centres at integer coordinates).
    """
    if kind not in VALIDATION_KINDS:
        raise ValueError(f"unknown validation kind {kind!r}; one of {', '.join(VALIDATION_KINDS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) BGR image, got {image.dtype} {image.shape}")
    rng = np.random.default_rng(seed)
    shape = image.shape[:2]
    scene = _to_linear(image)
    axis, turn = rng.uniform(0, 360), rng.choice([-1.0, 1.0])  # viewpoint axis, rotation direction
    darker, warmer, gamma_sign = rng.random() < 0.6, rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0])
    blur_mode = rng.choice(["gaussian", "defocus", "both"])
    images, homographies = [image], [np.eye(3)]
    for k in range(2, _NUM_IMAGES + 1):
        step = k - 2  # 0..4
        if kind == "viewpoint":
            inplane = _similarity(rng.uniform(0.9, 1.1), rng.uniform(-10, 10))
            H = _about_centre(inplane, shape) @ _viewpoint(shape, 10.0 + 12.5 * step, axis)
        elif kind == "zoom+rotation":
            H = _about_centre(_similarity(_ZOOMS[step], turn * (10.0 + 12.5 * step)), shape)
        else:
            H = _camera_shake(shape, k)
        lit = scene
        if kind == "light":  # shading and shadows lie on the scene, so they move with it
            lit = scene * (_shading(shape, 0.14 * (step + 1), rng) * _shadows(shape, 1 + step // 2, rng))[..., None]
        linear = _warp(lit, H)
        if kind == "light":  # exposure and white balance of the camera
            stops = -0.5 * (step + 1) if darker else 0.3 * (step + 1)
            c = warmer * 0.06 * (step + 1)
            linear = linear * (2.0**stops * np.exp(np.array([-c, 0.0, c], np.float32)))
        elif kind == "blur":
            if blur_mode in ("gaussian", "both"):
                linear = cv2.GaussianBlur(linear, (0, 0), _BLUR_SIGMAS[step] * (0.7 if blur_mode == "both" else 1.0))
            if blur_mode in ("defocus", "both"):
                radius = _DEFOCUS_RADII[step] * (0.7 if blur_mode == "both" else 1.0)
                linear = cv2.filter2D(linear, -1, _disc_kernel(radius), borderType=cv2.BORDER_CONSTANT)
        full_well, read_noise = _NOISE_LEVELS[step] if kind == "noise" else _BASE_NOISE
        linear = np.clip(_sensor_noise(linear, full_well, read_noise, rng), 0.0, 1.0)
        if kind == "light":  # the tone curve
            linear = linear ** np.float32(np.exp(gamma_sign * 0.08 * (step + 1)))
        out = _to_srgb(linear)
        if kind == "JPEG":
            ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITIES[step]])
            out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        images.append(out)
        homographies.append(H)
    return images, homographies


def kinds_in_turn(photos: Sequence[str]) -> list[tuple[str, str]]:
    """Each photo with the kind of its sequence: :data:`VALIDATION_KINDS` in turn over the photos in their order."""
    return [(name, VALIDATION_KINDS[i % len(VALIDATION_KINDS)]) for i, name in enumerate(photos)]


def ensure_sequences(photo_root: str | Path, plan: Sequence[tuple[str, str]], cache: str | Path, max_side: int | None = None,
                     progress: bool = False) -> Path:
    """Generate one sequence per photo of ``plan`` under ``cache`` unless a complete copy is there.

    Args:
        photo_root: the folder the photos' names are relative to.
        plan: (photo name with ``/`` separators, kind) pairs, e.g. from :func:`kinds_in_turn`;
            each photo is image 1 of a sequence of its kind (:func:`make_validation_sequence`,
            seeded by the photo's name).
        cache: cache folder; the sequences go into a sub-folder named by the generator
            version and a digest of the photos' names and bytes (and of ``max_side`` when given).
        max_side: photos whose longer side exceeds it are downscaled to it (area
            interpolation) before their sequences are made; None: taken as they are.
        progress: a progress bar on stderr.

    Returns:
        The folder holding one sub-folder per sequence (Oxford layout).

    Raises:
        ValueError: two photos whose sequence folders would have one name (:func:`sequence_name`);
            an unreadable photo (:class:`exemplar_desc.images.UnreadableImageError`).
    """
    folders = [sequence_name(name, kind) for name, kind in plan]
    clashes = sorted({folder for folder in folders if folders.count(folder) > 1})
    if clashes:
        raise ValueError(f"photos whose sequence folders would share a name: {', '.join(clashes)}")
    data, digest = {}, hashlib.sha1(_VERSION.encode())
    for name, _ in plan:
        data[name], sha1 = read_image_bytes(Path(photo_root) / name)
        digest.update(f"{name}:{sha1};".encode())
    if max_side is not None:
        digest.update(f"max_side:{max_side};".encode())
    root = Path(cache) / f"{_VERSION}-{digest.hexdigest()[:12]}"
    present = {s.name for s in load_sequences(root)[0]} if root.is_dir() else set()
    for (name, kind), folder in tqdm(list(zip(plan, folders)), desc="sequences", unit="seq", disable=not progress, leave=False):
        if folder in present:
            continue
        logger.info("generating validation sequence %s from %s", folder, name)
        image, _ = resize_to_max(decode_bgr(data[name], name), max_side)
        images, homographies = make_validation_sequence(image, kind, zlib.crc32(name.encode()))
        write_sequence(root / folder, images, homographies)
    return root


def ensure_validation_dataset(train_root: str | Path, cache: str | Path, photos: Sequence[str] | None = None) -> Path:
    """Generate the validation sequences under ``cache`` unless a complete copy is there (:func:`ensure_sequences`).

    Args:
        train_root: the training-photo root holding :data:`HELD_OUT_FOLDERS`.
        cache: cache folder; the sequences go into a sub-folder named by the generator
            version and a digest of the chosen photos' names and bytes.
        photos: a subset of :func:`held_out_photos` (same names, kinds and bytes as in the
            full set); None: all of them.

    Returns:
        The folder holding one sub-folder per sequence (Oxford layout).

    Raises:
        FileNotFoundError, ValueError: as :func:`held_out_photos`; ``photos`` names a photo
            that is not held out.
    """
    every = held_out_photos(train_root)
    plan = kinds_in_turn(every)
    if photos is not None:
        unknown = sorted(set(photos) - set(every))
        if unknown:
            raise ValueError(f"not held-out photos of {train_root}: {', '.join(unknown)}")
        wanted = set(photos)
        plan = [(name, kind) for name, kind in plan if name in wanted]
    return ensure_sequences(train_root, plan, cache)
