"""Image sequences with ground-truth homographies: loading and writing.

Two layouts are read, one folder per sequence:

* Oxford affine (Mikolajczyk et al.): ``img1`` ... ``img6`` and ``H1to2p`` ... ``H1to6p``;
* HPatches (Balntas et al.): ``1`` ... ``6`` and ``H_1_2`` ... ``H_1_6``;

images with any of the extensions ``.ppm .pgm .png .jpg``. A homography file is a
plain-text 3x3 matrix mapping pixel coordinates of the first image to those of image k
(OpenCV convention: pixel centres at integer coordinates); it is divided by H[2, 2] on
loading because some distributions (Oxford's leuven) are not normalised.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "KINDS",
    "ImageSequence",
    "SequenceError",
    "sequence_kind",
    "read_homography",
    "load_sequence",
    "load_sequences",
    "write_sequence",
    "default_cache_dir",
]

IMAGE_EXTENSIONS = (".ppm", ".pgm", ".png", ".jpg")
KINDS = ("viewpoint", "blur", "zoom+rotation", "light", "JPEG", "noise", "other")
# The eight Oxford sequences and the transformation each one shows.
OXFORD_KINDS = {
    "graf": "viewpoint",
    "wall": "viewpoint",
    "bikes": "blur",
    "trees": "blur",
    "boat": "zoom+rotation",
    "bark": "zoom+rotation",
    "leuven": "light",
    "ubc": "JPEG",
}
_LAYOUTS = {
    # name: (image stem of index k, homography file name of pair 1-k)
    "oxford": (lambda k: f"img{k}", lambda k: f"H1to{k}p"),
    "hpatches": (lambda k: f"{k}", lambda k: f"H_1_{k}"),
}
_MAX_IMAGES = 6


class SequenceError(ValueError):
    """A sequence folder that cannot be used; the message names the offending file."""


@dataclass
class ImageSequence:
    """One reference image and the images it is matched against.

    Attributes:
        name: folder name.
        kind: transformation kind, one of :data:`KINDS`.
        images: grey uint8 (H_k, W_k) images; ``images[0]`` is the reference image 1.
        homographies: ``homographies[k]`` is the (3, 3) float64 map from image 1 pixels to
            pixels of ``images[k]``, normalised so H[2, 2] = 1; ``homographies[0]`` is the identity.
        paths: the image files.
    """

    name: str
    kind: str
    images: list[np.ndarray]
    homographies: list[np.ndarray]
    paths: list[Path] = field(default_factory=list)

    @property
    def pairs(self) -> list[str]:
        """Pair labels "1-2", "1-3", ... in the order of ``images[1:]``."""
        return [f"1-{k + 1}" for k in range(1, len(self.images))]


def sequence_kind(name: str) -> str:
    """Transformation kind of a sequence from its folder name.

    Oxford names map to their kind; HPatches ``v_*`` is viewpoint and ``i_*`` light; other
    names are searched for a kind word (``viewpoint``, ``blur``, ``zoom``, ``rotation``,
    ``light``, ``jpeg``, ``noise``), else ``"other"``.
    """
    lower = name.lower()
    if lower in OXFORD_KINDS:
        return OXFORD_KINDS[lower]
    if lower.startswith("v_"):
        return "viewpoint"
    if lower.startswith("i_"):
        return "light"
    for word, kind in (("viewpoint", "viewpoint"), ("blur", "blur"), ("zoom", "zoom+rotation"),
                       ("rotation", "zoom+rotation"), ("light", "light"), ("jpeg", "JPEG"), ("noise", "noise")):
        if word in lower:
            return kind
    return "other"


def read_homography(path: Path) -> np.ndarray:
    """Read a plain-text 3x3 homography and normalise it by H[2, 2].

    Raises:
        SequenceError: unreadable, not 3x3 numbers, non-finite, or singular; the message names the file.
    """
    try:
        H = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise SequenceError(f"{path}: cannot read a 3x3 homography ({err})") from err
    if H.shape != (3, 3):
        raise SequenceError(f"{path}: expected a 3x3 matrix of numbers, got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise SequenceError(f"{path}: the homography contains non-finite values (nan or inf)")
    if abs(H[2, 2]) < 1e-12:
        raise SequenceError(f"{path}: H[2,2] is 0, cannot normalise the homography")
    H = H / H[2, 2]
    if abs(np.linalg.det(H)) < 1e-9 or np.linalg.cond(H) > 1e12:
        raise SequenceError(f"{path}: singular homography (det {np.linalg.det(H):.3g})")
    return H


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SequenceError(f"{path}: unreadable image file")
    return image


def load_sequence(folder: str | os.PathLike) -> ImageSequence:
    """Load one sequence folder in the Oxford or HPatches layout (detected from the file names).

    Images 1..k are read up to the last index that has an image or a homography file;
    each of them must exist, and each image k > 1 needs its homography file.

    Raises:
        SequenceError: unknown layout, fewer than two images, a missing homography,
            an unreadable image or homography file, a singular homography.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SequenceError(f"{folder}: not a folder")
    for layout, (image_stem, h_name) in _LAYOUTS.items():
        if _find_image(folder, image_stem(1)) is not None:
            break
    else:
        raise SequenceError(
            f"{folder}: no first image (expected img1 or 1 with extension {'/'.join(IMAGE_EXTENSIONS)})"
        )
    # The last index with an image or a homography; every index up to it needs both.
    last = max(k for k in range(1, _MAX_IMAGES + 1)
               if _find_image(folder, image_stem(k)) is not None or (folder / h_name(k)).is_file())
    paths, images, homographies = [], [], []
    for k in range(1, last + 1):
        path = _find_image(folder, image_stem(k))
        if path is None:
            raise SequenceError(
                f"{folder / image_stem(k)}.*: missing image {k} (expected extension {'/'.join(IMAGE_EXTENSIONS)})"
            )
        if k > 1:
            h_path = folder / h_name(k)
            if not h_path.is_file():
                raise SequenceError(f"{h_path}: missing homography for image {path.name}")
            homographies.append(read_homography(h_path))
        else:
            homographies.append(np.eye(3))
        images.append(_read_image(path))
        paths.append(path)
    if len(images) < 2:
        raise SequenceError(f"{folder}: a sequence needs at least two images, found {len(images)} ({layout} layout)")
    logger.debug("loaded %s: %d images, %s layout", folder, len(images), layout)
    return ImageSequence(folder.name, sequence_kind(folder.name), images, homographies, paths)


def load_sequences(root: str | os.PathLike) -> tuple[list[ImageSequence], dict[str, str]]:
    """Load every sequence under ``root`` (or ``root`` itself if it is one sequence).

    Returns:
        The sequences that loaded, sorted by name, and ``{folder name: error message}`` for
        those that did not; a bad sequence never stops the others.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found")
    folders = [root] if any(_find_image(root, s(1)) for s, _ in _LAYOUTS.values()) else sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    sequences, errors = [], {}
    for folder in folders:
        try:
            sequences.append(load_sequence(folder))
        except SequenceError as err:
            logger.warning("skipping sequence %s: %s", folder.name, err)
            errors[folder.name] = str(err)
    return sequences, errors


def default_cache_dir() -> Path:
    """Where generated and downloaded benchmark data live: ``$EXEMPLAR_DESC_CACHE``, else
    ``$XDG_CACHE_HOME/exemplar_desc``, else ``~/.cache/exemplar_desc``."""
    if os.environ.get("EXEMPLAR_DESC_CACHE"):
        return Path(os.environ["EXEMPLAR_DESC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exemplar_desc"


_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def write_sequence(folder: str | os.PathLike, images: list[np.ndarray], homographies: list[np.ndarray]) -> Path:
    """Write a sequence in the Oxford layout (``img{k}.ppm``/``.pgm``, ``H1to{k}p``), atomically.

    The files are written to a temporary sibling folder which then replaces ``folder``,
    so a reader never sees a half-written sequence.

    Args:
        folder: destination sequence folder; its name must be a plain file name.
        images: uint8 images, (H, W) grey (written as .pgm) or (H, W, 3) BGR (.ppm); image 1 first.
        homographies: (3, 3) maps from image 1 to image k, one per image (the first is ignored).

    Returns:
        The folder.
    """
    folder = Path(folder)
    if not _NAME_RE.match(folder.name):
        raise ValueError(f"invalid sequence folder name {folder.name!r}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for k, image in enumerate(images, start=1):
            ext = ".pgm" if image.ndim == 2 else ".ppm"
            if not cv2.imwrite(str(tmp / f"img{k}{ext}"), image):
                raise OSError(f"cannot write {tmp / f'img{k}{ext}'}")
            if k > 1:
                H = np.asarray(homographies[k - 1], dtype=np.float64)
                np.savetxt(tmp / f"H1to{k}p", H / H[2, 2], fmt="%.10e")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
