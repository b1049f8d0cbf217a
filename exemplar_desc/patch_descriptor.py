"""ExemplarPatchDescriptor: the Exemplar-CNN as a kornia patch descriptor module.

kornia describes local affine frames (LAFs) in two steps: ``extract_patches_from_pyramid``
cuts a ``P x P`` patch per frame, then a patch module (HardNet, SOSNet, TFeat, ...) maps
``(B, 1, P, P)`` patches to ``(B, D)`` descriptors. :class:`ExemplarPatchDescriptor` is such
a module, so ``kornia.feature.LAFDescriptor(ExemplarPatchDescriptor(), patch_size=32)``
describes kornia frames with the shipped Exemplar model.

A LAF ``[A | c]`` covers ``c + A [-1, 1]^2`` (pixels), the square that
:class:`~exemplar_desc.ExemplarDescriptor` samples for a cv2.KeyPoint. For a keypoint with
diameter ``size`` and OpenCV ``angle`` (degrees, clockwise on screen), the same patch is
``kornia.feature.laf_from_center_scale_ori(xy, scale, ori)`` with
``scale = magnification * size / 2`` (half the patch side) and ``ori = -angle`` (kornia's
orientation turns the patch counter-clockwise on screen); see :func:`keypoint_lafs`.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .model_io import load_model
from .patches import keypoint_frames, keypoints_to_arrays, normalize_patches

__all__ = ["ExemplarPatchDescriptor", "keypoint_lafs"]


class ExemplarPatchDescriptor(nn.Module):
    """Exemplar-CNN patch descriptor with kornia's patch-module interface.

    Example::

        import kornia.feature as KF
        descriptor = KF.LAFDescriptor(ExemplarPatchDescriptor(), patch_size=32)
        desc = descriptor(image, lafs)   # image (B, 1|3, H, W) in [0, 1], lafs (B, N, 2, 3) -> (B, N, 128)

    Each patch is standardised to zero mean and unit standard deviation inside the module,
    as the network was trained, so any affine intensity scale works; kornia's convention
    (and the docstring) is values in [0, 1].

    Args:
        model: shipped model name (see :func:`exemplar_desc.model_io.list_models`), or a path
            to a model card (.json) or weights file (.pt); ``None`` for the default model.

    Attributes:
        patch_size: side P of the patches the model takes (32 for the shipped models).
        magnification: the model card's patch side in units of ``KeyPoint.size``; kornia
            frames of the same patches have scale ``magnification * size / 2``.
        min_patch_side: the card's smallest patch side in pixels (0: none); the scale is then
            ``max(magnification * size, min_patch_side) / 2`` (:func:`keypoint_lafs`).
        card: the model card (dict).
    """

    def __init__(self, model: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.net, self.card = load_model(model)
        self.patch_size = int(self.card["patch_size"])
        self.magnification = float(self.card["magnification"])
        self.min_patch_side = float(self.card["min_patch_side"])

    @property
    def descriptor_size(self) -> int:
        """Descriptor length D (128 for the default model, 256 for ``exemplar-fast-t005-d256``)."""
        return int(self.card["head"]["dim"])

    def extra_repr(self) -> str:
        return f"model={self.card['name']!r}, patch_size={self.patch_size}, magnification={self.magnification:g}"

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Describe patches.

        Args:
            patches: (B, 1, P, P) float tensor, P = :attr:`patch_size`, grey values in [0, 1].

        Returns:
            (B, D) descriptors with unit L2 norm, in the module's dtype, on its device.

        Raises:
            TypeError: not a tensor, or not a floating-point dtype.
            ValueError: a shape other than (B, 1, P, P).
        """
        if not isinstance(patches, torch.Tensor):
            raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
        p = self.patch_size
        if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, p, p):
            raise ValueError(f"patches must have shape (B, 1, {p}, {p}) for this model, got {tuple(patches.shape)}")
        if not patches.is_floating_point():
            raise TypeError(f"patches must be a floating-point tensor (values in [0, 1]), got {patches.dtype}")
        return self.net(normalize_patches(patches))


def keypoint_lafs(
    keypoints: Sequence[cv2.KeyPoint], magnification: float, upright: bool = False, min_side: float = 0.0
) -> torch.Tensor:
    """kornia LAFs of the patches :class:`~exemplar_desc.ExemplarDescriptor` describes for cv2.KeyPoints.

    Equal to ``kornia.feature.laf_from_center_scale_ori(xy, max(magnification * size, min_side) / 2, -angle)``
    (angles of -1, no orientation, and ``upright`` give ``ori = 0``).

    Args:
        keypoints: N cv2.KeyPoints (``pt`` in pixels, ``size`` a diameter in pixels, ``angle``
            in degrees clockwise on screen, -1 for none).
        magnification: patch side in units of ``KeyPoint.size`` (the model card's).
        upright: ignore the keypoints' angles.
        min_side: smallest patch side in pixels (the descriptor's ``min_patch_side``).

    Returns:
        (1, N, 2, 3) float32 LAFs ``[A | c]`` in pixels.
    """
    xy, size, angle = keypoints_to_arrays(list(keypoints))
    frames = keypoint_frames(size, None if upright else angle, magnification, min_side)
    lafs = np.concatenate([frames, xy[:, :, None].astype(np.float64)], axis=2)
    return torch.from_numpy(lafs.astype(np.float32))[None]
