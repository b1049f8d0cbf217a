"""A descriptor model as an ONNX file, for programs without torch (OpenCV's dnn module, C++).

The file maps ``patches`` (N, 1, P, P) float32 grey values in [0, 1] to ``descriptors``
(N, D) float32 with unit L2 norm: the contract of
:class:`~exemplar_desc.patch_descriptor.ExemplarPatchDescriptor`, with the per-patch
standardisation inside the graph and N dynamic. The graph keeps to operators that
``cv2.dnn.readNetFromONNX`` reads: batch normalisation folded into the convolutions, the
head's adaptive pooling (max or average) as a fixed one, its signed power as a plain power,
and the L2 normalisation without shape arithmetic. The file's ``metadata_props`` record the model and
its patch geometry (:data:`METADATA_KEYS`), so a program can cut patches as
:meth:`~exemplar_desc.ExemplarDescriptor.compute` does without the model card.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .model_io import load_model
from .networks import FIXED_POOLINGS
from .patches import normalize_patches

logger = logging.getLogger(__name__)

__all__ = ["OPSET", "INPUT_NAME", "OUTPUT_NAME", "GEOMETRY_KEYS", "METADATA_KEYS", "OnnxDescriptorGraph", "export_onnx"]

#: ONNX operator set of the exported graph (read by OpenCV 4.x and 5.x, ONNX Runtime).
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "patches", "descriptors"
#: The metadata_props that give the patch geometry: patch side in units of KeyPoint.size,
#: smallest patch side in pixels (0: none), network input side P, descriptor length D.
GEOMETRY_KEYS = ("magnification", "min_patch_side", "patch_size", "descriptor_size")
#: Keys of the file's metadata_props: model name, sha256 of its weights file, then
#: :data:`GEOMETRY_KEYS` (all stored as strings).
METADATA_KEYS = ("model", "sha256", *GEOMETRY_KEYS)


class OnnxDescriptorGraph(nn.Module):
    """What :class:`~exemplar_desc.patch_descriptor.ExemplarPatchDescriptor` computes, in exportable operators.

    Args:
        model: shipped model name, or a path to a model card (.json) or weights file (.pt);
            ``None`` for the default model (as :func:`~exemplar_desc.model_io.load_model`).

    Attributes:
        net: the model's network, batch normalisation folded into the convolutions, float32, CPU.
        card: the model card (dict).
        patch_size: side P of the input patches in pixels.

    Raises:
        FileNotFoundError: unknown model or missing file.
        ValueError: a corrupted or malformed model, a head that is not fitted, or a feature map
            whose side is not a multiple of the head's grid (no fixed pooling equals the adaptive one then).
    """

    def __init__(self, model: str | os.PathLike | None = None) -> None:
        super().__init__()
        net, self.card = load_model(model)
        self.net = net.fuse_batch_norm()
        self.patch_size = int(self.card["patch_size"])
        name = self.card["name"]
        if not torch.any(net.head.projection):
            raise ValueError(f"model {name!r}: the descriptor head is not fitted, so there is nothing to export")
        with torch.no_grad():
            height, width = net.features(torch.zeros(1, 1, self.patch_size, self.patch_size)).shape[-2:]
        grid = net.head.grid
        if height % grid or width % grid:
            raise ValueError(
                f"model {name!r}: the {height}x{width} feature map of {self.patch_size}-pixel patches is not a multiple "
                f"of the {grid}x{grid} pooling grid, so its adaptive pooling has no fixed-size equivalent"
            )
        self.kernel = (height // grid, width // grid)
        self.pool = FIXED_POOLINGS[net.head.pooling]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 1, P, P) float32 grey patches in [0, 1] -> (N, D) float32 descriptors with unit L2 norm."""
        head = self.net.head
        pooled = self.pool(self.net.features(normalize_patches(patches)), self.kernel).flatten(1)
        if head.power != 1:
            # The trunk ends with a ReLU, so pooled >= 0 and sign(x) |x|^p is x^p (no Sign/Abs operators).
            pooled = pooled.pow(head.power)
        desc = (pooled - head.mean) @ head.projection
        # F.normalize's max(norm, 1e-12), written so the graph needs no Shape/Expand of N.
        return desc / desc.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _onnx_bytes(graph: OnnxDescriptorGraph, opset: int) -> bytes:
    """The serialised graph (legacy TorchScript exporter: no onnxscript needed), batch dimension ``N`` dynamic."""
    buffer = io.BytesIO()
    p = graph.patch_size
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated; the tracer warns that the patch's
        # element count becomes a constant, which it is (P is fixed; N stays dynamic).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph, (torch.zeros(2, 1, p, p),), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )
    return buffer.getvalue()


def export_onnx(
    model: OnnxDescriptorGraph | str | os.PathLike | None, path: str | os.PathLike, opset: int = OPSET
) -> dict[str, str]:
    """Write a descriptor model as an ONNX file, atomically (readers never see half a file).

    Args:
        model: an :class:`OnnxDescriptorGraph`, or what it takes (a shipped model name, a
            card or weights path, ``None`` for the default model).
        path: the file to write; an existing file is replaced.
        opset: ONNX operator set.

    Returns:
        The metadata written into the file's ``metadata_props``, :data:`METADATA_KEYS` -> string.

    Raises:
        FileNotFoundError, ValueError: see :class:`OnnxDescriptorGraph`.
        ImportError: the ``onnx`` package is missing (``pip install 'exemplar_desc[onnx]'``).
    """
    import onnx  # optional dependency, needed only here

    graph = model if isinstance(model, OnnxDescriptorGraph) else OnnxDescriptorGraph(model)
    card = graph.card
    proto = onnx.load_from_string(_onnx_bytes(graph.eval(), opset))
    metadata = {
        "model": str(card["name"]), "sha256": str(card["sha256"]), "magnification": repr(float(card["magnification"])),
        "min_patch_side": repr(float(card["min_patch_side"])), "patch_size": str(graph.patch_size),
        "descriptor_size": str(int(card["head"]["dim"])),
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = (
        f"Exemplar-CNN descriptor {metadata['model']}: {INPUT_NAME} (N, 1, P, P) float32 grey values in [0, 1], "
        f"P = {graph.patch_size} -> {OUTPUT_NAME} (N, {metadata['descriptor_size']}) float32, unit L2 norm"
    )
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    logger.info("exported model %s to %s (%d bytes)", metadata["model"], path, len(data))
    return metadata
