"""ExemplarDescriptor: the Exemplar-CNN descriptor behind OpenCV's Feature2D interface."""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch

from .checks import check, check_number
from .hardware import cpu_supports
from .int8 import INT8_CPUS, Int8DescriptorNet, int8_available, native_int8
from .model_io import load_model, resolve_card_path
from .networks import DescriptorNet
from .quantization import quantize_uint8
from .patches import (
    BGR_TO_GRAY,
    build_pyramid,
    extract_patches,
    gray_tensor,
    keypoint_frames,
    keypoints_to_arrays,
    normalize_patches,
    to_gray_float,
)

logger = logging.getLogger(__name__)

__all__ = ["ExemplarDescriptor", "PRECISIONS", "PRECISION_CHOICES", "describe_frames", "describe_images", "native_bf16",
           "resolve_precision"]

#: Arithmetic of the convolutions: name -> torch dtype of the trunk (``"auto"`` resolves to one
#: of them; ``"int8"`` quantises the float32 trunk, :mod:`exemplar_desc.int8`).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
#: What the ``precision`` argument and every ``--precision`` option accept.
PRECISION_CHOICES = ("auto", *PRECISIONS)


def native_bf16(device: str | torch.device) -> bool:
    """Whether the device computes bfloat16 convolutions in hardware.

    CPUs need AVX512-BF16 or AMX (oneDNN emulates bfloat16 elsewhere, slower than float32);
    CUDA GPUs need compute capability 8.0 or newer.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_supports("avx512_bf16") or cpu_supports("amx_tile")
    return False


def resolve_precision(precision: str, device: str | torch.device, int8_calibrated: bool = True) -> str:
    """``"fp32"``, ``"bf16"`` or ``"int8"``, the arithmetic ``precision`` stands for on ``device``.

    ``"auto"`` is ``"int8"`` on x86 CPUs with AVX2
    (:func:`exemplar_desc.int8.native_int8`), for a model whose card holds an int8 calibration
    (``int8_calibrated``), else ``"bf16"`` where :func:`native_bf16` holds, else ``"fp32"``:
    the fastest that keeps the benchmark results where it was measured (docs/throughput.md).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISION_CHOICES`.
    """
    if precision == "auto":
        if int8_calibrated and native_int8(device):
            return "int8"
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    return precision


@torch.inference_mode()
def describe_frames(
    net: DescriptorNet,
    pyramid: list[torch.Tensor],
    centers: np.ndarray,
    frames: np.ndarray,
    patch_size: int = 32,
    batch_size: int = 1024,
) -> np.ndarray:
    """Describe patches ``centers + frames @ [-1, 1]^2`` (see :func:`extract_patches`) in batches.

    Args:
        net: descriptor network (eval mode) on any device.
        pyramid: from :func:`build_pyramid`.
        centers: (N, 2) pixels (x, y); frames: (N, 2, 2) pixels.

    Returns:
        (N, D) float32 descriptors with unit L2 norm.
    """
    return describe_images(net, [(pyramid, centers, frames)], len(centers), patch_size, batch_size).cpu().numpy()


@torch.inference_mode()
def describe_images(
    net: DescriptorNet,
    items: Iterable[tuple[list[torch.Tensor], np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    total: int,
    patch_size: int = 32,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Describe the patches of many images in shared network batches of ``batch_size``.

    Patches of consecutive images are concatenated, so a batch may hold the end of one image
    and the start of the next; at most ``2 * batch_size`` patches are held at once, and an
    image's pyramid is dropped once its patches are cut (``items`` may be a generator).
    Everything stays on the network's device: sampling, standardisation, network, head.

    Args:
        net: descriptor network (eval mode) on any device.
        items: per image ``(pyramid, centers, frames)`` as for :func:`describe_frames`, the
            pyramid on the network's device (numpy centers and frames are uploaded).
        total: the number of keypoints of all images together.

    Returns:
        (total, D) float32 descriptors with unit L2 norm on the network's device, images in order.
    """
    device = net.head.projection.device
    out = torch.empty((total, net.head.projection.shape[1]), dtype=torch.float32, device=device)
    pending: list[torch.Tensor] = []
    held = done = 0

    def run(count: int) -> None:
        nonlocal pending, held, done
        batch = torch.cat(pending) if len(pending) > 1 else pending[0]
        batch = batch.to(device).contiguous(memory_format=torch.channels_last)
        out[done : done + count] = net(batch[:count]).float()
        pending, held, done = [batch[count:]] if count < len(batch) else [], held - count, done + count

    for pyramid, centers, frames in items:
        start = 0
        while start < len(centers):
            stop = min(len(centers), start + batch_size - held)  # fill the batch exactly
            pending.append(normalize_patches(extract_patches(pyramid, centers[start:stop], frames[start:stop], patch_size)))
            held += stop - start
            start = stop
            if held == batch_size:
                run(batch_size)
    if held:
        run(held)
    if done != total:
        raise ValueError(f"total={total} but the images hold {done} keypoints")
    return out


class ExemplarDescriptor:
    """Exemplar-CNN local descriptor with OpenCV's ``Feature2D`` methods.

    Example::

        descriptor = ExemplarDescriptor()                 # the shipped default model
        kps = cv2.SIFT_create(nfeatures=2000).detect(img, None)
        kps, desc = descriptor.compute(img, kps)          # (N, 128) float32, unit L2 norm

    Each keypoint's patch is a square of side ``magnification * KeyPoint.size`` pixels
    centred on ``KeyPoint.pt``, turned by ``KeyPoint.angle`` (clockwise, degrees) unless
    ``upright``, cut from an anti-aliased image pyramid and resampled to the network's
    input size. ``compute`` returns every keypoint it was given, in order (points near or
    beyond the border get reflected image content).

    Args:
        model: shipped model name (see :func:`exemplar_desc.model_io.list_models`), or a path
            to a model card (.json) or weights file (.pt); ``None`` for the default model.
        device: torch device, ``"cpu"`` (default) or ``"cuda"``.
        upright: ignore keypoint angles.
        magnification: patch side in units of ``KeyPoint.size``; ``None`` uses the model card's.
        min_patch_side: smallest patch side in pixels (``keypoint_frames``' ``min_side``); ``None``
            uses the model card's, 0 where it has none.
        batch_size: keypoints per network batch; bounds memory for any number of keypoints.
        detector: ``cv2.Feature2D`` used by :meth:`detect`; default ``cv2.SIFT_create()``.
        output_dtype: ``np.float32`` (default) or ``np.uint8`` (one byte per dimension, constant norm,
            so COLMAP's dot-product matching ranks like L2; see :mod:`exemplar_desc.quantization`).
        precision: ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or ``"int8"``. ``"bf16"`` runs the
            convolutions in bfloat16 (the head stays float32): on CPUs with AVX512-BF16/AMX
            about 2x faster, descriptors within cosine 0.999 of fp32's and the same benchmark
            results (docs/throughput.md), but slow on CPUs without them. ``"int8"`` (x86 CPUs
            with AVX2) runs them on 8-bit integers with the ranges calibrated in the model card
            (:mod:`exemplar_desc.int8`), within 0.2 points of fp32's per-kind mAP and MMA@3 on
            the validation set and Oxford (docs/throughput.md). ``"auto"`` takes int8 on those
            CPUs when the card holds the calibration, else bf16 where the device has bfloat16
            hardware, else fp32 (:func:`resolve_precision`);
            ``self.precision`` holds the choice.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        upright: bool = False,
        magnification: float | None = None,
        min_patch_side: float | None = None,
        batch_size: int = 1024,
        detector: cv2.Feature2D | None = None,
        output_dtype: type = np.float32,
        precision: str = "auto",
    ) -> None:
        check_number("batch_size", batch_size, low=1, integer=True)
        if min_patch_side is not None:
            check_number("min_patch_side", min_patch_side, low=0)
        if np.dtype(output_dtype) not in (np.float32, np.uint8):
            raise ValueError(f"output_dtype must be np.float32 or np.uint8, got {output_dtype}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available; use device='cpu'")
        resolve_precision(precision, self.device)  # a bad value fails before the model loads
        check(precision != "int8" or int8_available(self.device), "precision", precision,
              f"needs {INT8_CPUS} and torch's quantised engine for it; use 'auto' or 'fp32'")
        self.net, self.card = load_model(model, self.device)
        self._card_path = resolve_card_path(model).resolve()  # for pickling: the card, wherever the copy runs
        if precision == "auto":
            precision = resolve_precision(precision, self.device, int8_calibrated=bool(self.card.get("int8")))
            logger.info("precision='auto' runs %s on %s for %s", precision, self.device, self.card["name"])
        if precision == "int8":
            self.net = Int8DescriptorNet(self.net, self.card.get("int8"))
        else:
            self.net = self.net.fuse_batch_norm().to(memory_format=torch.channels_last)
            self.net.trunk.to(PRECISIONS[precision])
        self.precision = precision
        if magnification is not None:
            check_number("magnification", magnification, low=0, low_open=True)
        self.magnification = float(self.card["magnification"] if magnification is None else magnification)
        self.min_patch_side = float(self.card["min_patch_side"] if min_patch_side is None else min_patch_side)
        self.patch_size = int(self.card["patch_size"])
        self.upright = upright
        self.batch_size = int(batch_size)
        self.output_dtype = np.dtype(output_dtype)
        self._own_detector = detector is None  # SIFT, which a pickled copy recreates
        self.detector = detector if detector is not None else cv2.SIFT_create()

    def __reduce__(self) -> tuple:
        """Pickle (``multiprocessing``, ``joblib``, ``copy.deepcopy``) as what rebuilds it: the model card's path,
        the settings and the arithmetic it runs, so a copy in another process computes the same descriptors.

        Raises:
            TypeError: it was given its own ``detector``, which cannot be pickled (OpenCV's detectors cannot).
        """
        if not self._own_detector:
            raise TypeError("an ExemplarDescriptor given its own detector cannot be pickled, since OpenCV's detectors "
                            "cannot; create it in each process, or pickle one with the default detector")
        return (type(self), (str(self._card_path), str(self.device), self.upright, self.magnification, self.min_patch_side,
                             self.batch_size, None, self.output_dtype.type, self.precision))

    def __repr__(self) -> str:
        return (
            f"ExemplarDescriptor(model={self.card['name']!r}, device={str(self.device)!r}, upright={self.upright}, "
            f"magnification={self.magnification:g}, precision={self.precision!r})"
        )

    # --- Feature2D interface -------------------------------------------------------------

    def descriptorSize(self) -> int:
        """Descriptor length (128 for the default model, 256 for ``exemplar-fast-t005-d256``)."""
        return int(self.card["head"]["dim"])

    def descriptorType(self) -> int:
        """``cv2.CV_32F``, or ``cv2.CV_8U`` with ``output_dtype=np.uint8``."""
        return cv2.CV_8U if self.output_dtype == np.uint8 else cv2.CV_32F

    def defaultNorm(self) -> int:
        """``cv2.NORM_L2``: descriptors are compared by Euclidean distance."""
        return cv2.NORM_L2

    def getDefaultName(self) -> str:
        return "Feature2D.ExemplarDescriptor"

    def detect(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[cv2.KeyPoint, ...]:
        """Keypoints of the detector (default SIFT/DoG) on the image's grey version.

        Args:
            image: see :meth:`compute`.
            mask: optional (H, W) uint8; keypoints only where it is non-zero.
        """
        gray = to_gray_float(image)
        return self.detector.detect(self._to_uint8(gray), self._check_mask(mask, gray.shape))

    def compute(
        self, image: np.ndarray | Sequence[np.ndarray], keypoints: Sequence[cv2.KeyPoint] | Sequence[Sequence[cv2.KeyPoint]]
    ) -> tuple[list[cv2.KeyPoint], np.ndarray | None] | tuple[list[list[cv2.KeyPoint]], list[np.ndarray | None]]:
        """Describe keypoints of one image, or of many images in shared network batches.

        Args:
            image: (H, W) grey, (H, W, 3) BGR or (H, W, 4) BGRA; uint8, uint16 or float in [0, 1].
                Or a list of such images (OpenCV's convention for many images), with
                ``keypoints`` a list of keypoint lists of the same length.
            keypoints: cv2.KeyPoints from any detector (pixel coordinates, ``size`` a diameter in
                pixels, ``angle`` in degrees clockwise, -1 for none).

        Returns:
            (keypoints as a list, in the given order; descriptors (N, D) float32 with unit L2 norm,
            or uint8 with ``output_dtype=np.uint8``). An empty keypoint list gives ``([], None)``.
            For a list of images: a list of keypoint lists and a list of descriptor arrays (or
            None), one per image. The patches of all images are described in network batches
            of ``batch_size``, so many images with few keypoints each fill the batches.
        """
        if isinstance(image, (list, tuple)):
            if not isinstance(keypoints, (list, tuple)) or len(keypoints) != len(image):
                raise TypeError(
                    f"with a list of {len(image)} images, keypoints must be a list of {len(image)} keypoint lists, "
                    f"got {type(keypoints).__name__}" + (f" of length {len(keypoints)}" if isinstance(keypoints, (list, tuple)) else "")
                )
            return self._compute_many(list(image), list(keypoints), "images[{}]", "keypoints[{}]")
        kps, desc = self._compute_many([image], [keypoints], "image", "keypoints")
        return kps[0], desc[0]

    def detectAndCompute(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        keypoints: Sequence[cv2.KeyPoint] | None = None,
        useProvidedKeypoints: bool = False,
    ) -> tuple[list[cv2.KeyPoint], np.ndarray | None]:
        """:meth:`detect` then :meth:`compute`; with ``useProvidedKeypoints`` describe ``keypoints`` instead."""
        if useProvidedKeypoints:
            if keypoints is None:
                raise ValueError("useProvidedKeypoints=True needs keypoints")
            return self.compute(image, keypoints)
        return self.compute(image, self.detect(image, mask))

    # --- kornia interface ----------------------------------------------------------------

    def compute_lafs(self, image: torch.Tensor, lafs: torch.Tensor) -> torch.Tensor:
        """Describe kornia local affine frames.

        Args:
            image: (B, C, H, W) float tensor in [0, 1], C = 1 (grey) or 3 (RGB).
            lafs: (B, N, 2, 3) frames ``[A | c]`` in pixels (kornia's convention: the patch
                covers ``c + A [-1, 1]^2``). The full affine shape of ``A`` is used.

        Returns:
            (B, N, D) float32 descriptors with unit L2 norm, on the input's device.
        """
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be a (B, 1|3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
        if not isinstance(lafs, torch.Tensor) or lafs.ndim != 4 or lafs.shape[2:] != (2, 3) or lafs.shape[0] != image.shape[0]:
            raise ValueError(f"lafs must be a (B, N, 2, 3) tensor with the image's B, got {getattr(lafs, 'shape', type(lafs))}")
        input_device = image.device
        finite = torch.isfinite(lafs).flatten(2).all(2)
        if not finite.all():
            b, n = (int(i) for i in torch.nonzero(~finite)[0])
            raise ValueError(f"lafs[{b}, {n}] = {lafs[b, n].tolist()}: must be finite pixels")
        image, lafs = image.detach().to(self.device), lafs.detach().to(self.device, torch.float64)
        if image.shape[1] == 3:  # RGB, with OpenCV's grey weights
            b, g, r = BGR_TO_GRAY
            image = image[:, 0:1] * r + image[:, 1:2] * g + image[:, 2:3] * b
        items = ((build_pyramid(img[0].float()), laf[:, :, 2], laf[:, :, :2]) for img, laf in zip(image, lafs))
        desc = describe_images(self.net, items, lafs.shape[0] * lafs.shape[1], self.patch_size, self.batch_size)
        return desc.reshape(lafs.shape[0], lafs.shape[1], -1).to(input_device)

    # --- internals -----------------------------------------------------------------------

    def _compute_many(
        self, images: list, keypoints: list, image_name: str, keypoints_name: str
    ) -> tuple[list[list[cv2.KeyPoint]], list[np.ndarray | None]]:
        """Check every keypoint list, then describe the images' keypoints in shared batches."""
        lists, arrays = [], []
        for i, kps in enumerate(keypoints):
            name = keypoints_name.format(i)
            if kps is None:
                raise TypeError(f"{name} must be a sequence of cv2.KeyPoint, got None")
            kps = list(kps)
            lists.append(kps)
            arrays.append(keypoints_to_arrays(kps, name) if kps else None)

        def items():
            for i, (image, arr) in enumerate(zip(images, arrays)):
                gray = gray_tensor(image, self.device, image_name.format(i))  # checks every image
                if arr is not None:
                    xy, size, angle = arr
                    frames = keypoint_frames(size, None if self.upright else angle, self.magnification, self.min_patch_side)
                    yield build_pyramid(gray), torch.from_numpy(xy).to(self.device), torch.from_numpy(frames).to(self.device)

        counts = [len(k) for k in lists]
        desc = describe_images(self.net, items(), sum(counts), self.patch_size, self.batch_size).cpu().numpy()
        parts = np.split(desc, np.cumsum(counts)[:-1])
        return lists, [self._finish(d) if len(d) else None for d in parts]

    def _finish(self, desc: np.ndarray) -> np.ndarray:
        return quantize_uint8(desc, signed=True) if self.output_dtype == np.uint8 else desc

    @staticmethod
    def _to_uint8(gray: np.ndarray) -> np.ndarray:
        return np.round(gray * 255.0).astype(np.uint8)

    @staticmethod
    def _check_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
        if mask is None:
            return None
        if not isinstance(mask, np.ndarray) or mask.shape != shape:
            raise ValueError(f"mask must be a numpy array of shape {shape} (the image's H, W), got {getattr(mask, 'shape', type(mask))}")
        return (mask != 0).astype(np.uint8)
