"""Exemplar-CNN local feature descriptor (Dosovitskiy et al., NIPS 2014 / TPAMI 2016).

``ExemplarDescriptor`` describes cv2.KeyPoints with OpenCV's Feature2D interface, using
the trained models shipped in ``weights/``; ``ExemplarPatchDescriptor`` is the same
network as a kornia patch-descriptor module. The package has three parts: the descriptor
core (this folder), :mod:`exemplar_desc.training` and :mod:`exemplar_desc.sfm`.
"""

from .registry import create_descriptor
from .descriptor import ExemplarDescriptor
from .model_io import DEFAULT_MODEL, list_models
from .patch_descriptor import ExemplarPatchDescriptor

__all__ = ["ExemplarDescriptor", "ExemplarPatchDescriptor", "DEFAULT_MODEL", "create_descriptor", "list_models"]
__version__ = "0.1.0"
