"""Feature extraction into hloc's ``features.h5``: detection once per image, any descriptors.

``python -m exemplar_desc.extract`` (features for hloc) and the SfM command
(:mod:`exemplar_desc.sfm`) both extract through :func:`extract_features`, so one image,
descriptor and settings give the same file; the layout is :mod:`exemplar_desc.formats.hloc`'s.

Keypoints are found once per image by OpenCV's SIFT (DoG) detector on the image
downscaled to ``max_size``, and every descriptor describes the same keypoints, so runs
with different descriptors compare descriptors only. An Exemplar descriptor describes
patches of side ``magnification x KeyPoint.size``; both command lines take the magnification
by the names of :data:`MAGNIFICATIONS` (:func:`resolve_magnification`), ``sfm`` by default,
which also sets the smallest patch side (:func:`resolve_min_patch_side`).

Streaming: images are read, decoded, resized and detected in ``workers`` processes (a torch
DataLoader; 0 does it in the calling process), in input order; an Exemplar descriptor
describes the keypoints of consecutive images together in network batches of its
``batch_size`` (:meth:`ExemplarDescriptor.compute` with lists), and each image is written
as soon as it is described.

Re-runs: each group records the image file's SHA-1, the descriptor name, its identity (an
Exemplar model's weights hash and patch geometry) and the extraction settings; an
image whose record matches is copied from the previous file instead of being processed
again. Files are written to ``<name>.tmp`` and moved into place with ``os.replace`` after
the root attribute ``complete`` is set, so an interrupted run never leaves a partial file
under the final name.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import h5py
import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

from .checks import OptionError, check_number
from .descriptor import ExemplarDescriptor
from .distributed import Distributed
from .formats.hloc import FEATURES_FORMAT, check_feature_file, feature_datasets, merge_parts, write_features
from .images import UnreadableImageError, decode_gray, read_image_bytes, resize_to_max

logger = logging.getLogger(__name__)

__all__ = [
    "SFM_MAGNIFICATION",
    "MAGNIFICATIONS",
    "DEFAULT_MAGNIFICATION",
    "SFM_MIN_PATCH_SIDE",
    "resolve_magnification",
    "resolve_min_patch_side",
    "ExtractionResult",
    "extract_features",
    "extract_features_across_ranks",
    "merge_extraction_results",
]

DETECTOR = "opencv-sift-dog"

#: Patch magnification (patch side / ``KeyPoint.size``) of the Exemplar descriptors for
#: structure from motion, chosen on the validation set (docs/model-development.md, "SfM
#: settings: magnification 5 and ratio 0.95"): well under the shipped cards' (10 for the default model), whose larger patches match
#: better under blur, because a reconstruction needs precisely placed matches.
SFM_MAGNIFICATION = 5.0
#: The magnifications both command lines accept by name: ``sfm`` (:data:`SFM_MAGNIFICATION`)
#: and ``card`` (None: the model card's own).
MAGNIFICATIONS: dict[str, float | None] = {"sfm": SFM_MAGNIFICATION, "card": None}
#: What ``python -m exemplar_desc.extract`` and the SfM command describe with unless told:
#: features for hloc and COLMAP are features for a reconstruction.
DEFAULT_MAGNIFICATION = "sfm"
#: Smallest patch side in pixels of the Exemplar descriptors at :data:`SFM_MAGNIFICATION`:
#: none, whatever the card's. A card's floor is chosen at the card's magnification; at 5 it
#: would widen most keypoints' patches, and the rule that chose 5 keeps none
#: (docs/model-development.md, "SfM settings: magnification 5 and ratio 0.95").
SFM_MIN_PATCH_SIDE = 0.0


def resolve_magnification(value: str | float | None) -> float | None:
    """The patch magnification for :func:`exemplar_desc.create_descriptor` of a name, a number or its text.

    Args:
        value: a name of :data:`MAGNIFICATIONS` (``"sfm"``, ``"card"``), None (the card's),
            a number > 0, or a number's text (``"7"``).

    Returns:
        The magnification, or None for the model card's.

    Raises:
        OptionError: naming ``magnification``: another name, or a number not finite and > 0.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value in MAGNIFICATIONS:
            return MAGNIFICATIONS[value]
        try:
            value = float(value)
        except ValueError:
            raise OptionError("magnification", value, f"must be {', '.join(MAGNIFICATIONS)} or a number > 0") from None
    check_number("magnification", value, low=0, low_open=True)
    return float(value)


def resolve_min_patch_side(magnification: str | float | None) -> float | None:
    """The smallest patch side that goes with a magnification as :func:`resolve_magnification` takes it.

    Returns:
        :data:`SFM_MIN_PATCH_SIDE` (pixels) for ``"sfm"``, the SfM patch geometry; None (the
        model card's) for ``"card"``, None or a number.
    """
    return SFM_MIN_PATCH_SIDE if magnification == "sfm" else None


@dataclass
class ExtractionResult:
    """What :func:`extract_features` did.

    Attributes:
        names: images now in the feature files, in input order.
        skipped: unreadable images, name -> reason.
        reused: images copied from the previous files (all descriptors up to date).
        num_keypoints: descriptor name -> image name -> number of keypoints.
    """

    names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    num_keypoints: dict[str, dict[str, int]] = field(default_factory=dict)


def _identity(descriptor: Any) -> str:
    """What distinguishes two extractors of one name: an Exemplar model's weights and patch geometry."""
    card = getattr(descriptor, "card", None)
    if card is not None:
        precision = "" if descriptor.precision == "fp32" else f", precision {descriptor.precision}"
        floor = f", min patch side {descriptor.min_patch_side:g}" if descriptor.min_patch_side else ""
        return f"sha256 {card['sha256']}, magnification {descriptor.magnification:g}{floor}, upright {descriptor.upright}{precision}"
    return f"{type(descriptor).__name__}, OpenCV {cv2.__version__}"


def _settings(descriptor_name: str, descriptor: Any, max_size: int | None, max_keypoints: int) -> dict[str, Any]:
    return {
        "descriptor": descriptor_name,
        "descriptor_identity": _identity(descriptor),
        "detector": DETECTOR,
        "max_size": int(max_size or 0),
        "max_keypoints": int(max_keypoints),
    }


def _reusable_sha1(old: h5py.File | None, name: str, settings: Mapping[str, Any]) -> str | None:
    """The image file's SHA-1 recorded for ``name`` in the previous file, if made with these settings."""
    if old is None or name not in old:
        return None
    attrs = old[name].attrs
    return attrs.get("sha1") if all(attrs.get(k) == v for k, v in settings.items()) else None


@dataclass
class _Detected:
    """One image as a worker hands it over (picklable: keypoints as an array, not cv2.KeyPoints).

    Attributes:
        todo: descriptors whose previous record does not match (empty: copy every group).
        image: (h, w) uint8, resized to ``max_size``; None when nothing is to do or on error.
        keypoints: (N, 7) float64 rows (x, y, size, angle, response, octave, class_id) on ``image``.
        scale: (2,) processed pixels per original pixel along (x, y).
        image_size: (2,) int32 (W, H) of the original image.
    """

    name: str
    sha1: str = ""
    error: str | None = None
    todo: tuple[str, ...] = ()
    image: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    scale: np.ndarray | None = None
    image_size: np.ndarray | None = None

    def cv_keypoints(self) -> list[cv2.KeyPoint]:
        return [cv2.KeyPoint(x, y, size, angle, response, int(octave), int(cid))
                for x, y, size, angle, response, octave, cid in self.keypoints.tolist()]


class _ImageSource(torch.utils.data.Dataset):
    """Reads, fingerprints, decodes, resizes and detects one image per item (in a worker process)."""

    def __init__(self, image_dir: Path, names: Sequence[str], done: Mapping[str, Mapping[str, str]],
                 max_size: int | None, max_keypoints: int) -> None:
        self.image_dir, self.names, self.done = image_dir, list(names), done
        self.max_size, self.max_keypoints = max_size, max_keypoints
        self._detector: cv2.Feature2D | None = None  # made in the process that uses it

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> _Detected:
        name = self.names[index]
        try:
            data, sha1 = read_image_bytes(self.image_dir / name)
        except OSError as err:
            return _Detected(name, error=f"cannot read file: {err}")
        todo = tuple(d for d, sha1s in self.done.items() if sha1s.get(name) != sha1)
        if not todo:
            return _Detected(name, sha1)
        try:
            full = decode_gray(data, name)
        except UnreadableImageError as err:
            return _Detected(name, sha1, error=str(err))
        image, scale = resize_to_max(full, self.max_size)
        if self._detector is None:
            self._detector = cv2.SIFT_create(nfeatures=self.max_keypoints)
        # Deterministic, so descriptors extracted now and copied ones share keypoints.
        kps = self._detector.detect(image, None)
        rows = np.array([(*kp.pt, kp.size, kp.angle, kp.response, kp.octave, kp.class_id) for kp in kps],
                        dtype=np.float64).reshape(-1, 7)
        return _Detected(name, sha1, None, todo, image, rows, scale, np.array([full.shape[1], full.shape[0]], np.int32))


def _as_is(item: _Detected) -> _Detected:
    return item


def _worker_init(_: int) -> None:
    # Each worker is one of several processes: one thread each avoids oversubscribing the cores.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _describe(
    descriptor: Any, images: Sequence[np.ndarray], keypoints: Sequence[Sequence[cv2.KeyPoint]], scales: Sequence[np.ndarray]
) -> list[dict[str, np.ndarray]]:
    """Describe keypoints found on processed images; return hloc datasets in original pixels, per image.

    An :class:`ExemplarDescriptor` describes all images in shared network batches; other
    descriptors one image at a time.
    """
    dim = int(descriptor.descriptorSize())
    if isinstance(descriptor, ExemplarDescriptor):
        described = list(zip(*descriptor.compute(list(images), list(keypoints))))
    else:
        described = [descriptor.compute(image, kps) if len(kps) else ((), None) for image, kps in zip(images, keypoints)]
    out = []
    for (kps, desc), scale in zip(described, scales):
        if desc is None or len(kps) == 0:
            kps, desc = (), np.zeros((0, dim), np.float32)
        out.append(feature_datasets(kps, np.asarray(desc, dtype=np.float32).reshape(len(kps), dim), scale))
    return out


def _write_batch(
    batch: list[_Detected],
    descriptors: Mapping[str, Any],
    olds: Mapping[str, h5py.File | None],
    news: Mapping[str, h5py.File],
    settings: Mapping[str, Mapping[str, Any]],
    result: ExtractionResult,
) -> None:
    """Describe the images of ``batch`` that need it, then write every one of them, in order."""
    described: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for dname, descriptor in descriptors.items():
        items = [item for item in batch if dname in item.todo]
        if items:
            datasets = _describe(descriptor, [i.image for i in items], [i.cv_keypoints() for i in items],
                                 [i.scale for i in items])
            described[dname] = {item.name: d for item, d in zip(items, datasets)}
    for item in batch:
        if not item.todo:
            result.reused.append(item.name)
        for dname, out in news.items():
            if dname in item.todo:
                write_features(out, item.name, described[dname][item.name], item.image_size, item.scale,
                               {"sha1": item.sha1, **settings[dname]})
            else:
                olds[dname].copy(olds[dname][item.name], out, name=item.name)
            result.num_keypoints[dname][item.name] = int(out[item.name]["keypoints"].shape[0])
        result.names.append(item.name)


def _open_files(
    stack: ExitStack,
    feature_paths: Mapping[str, str | Path],
    tmp_paths: Mapping[str, Path],
    previous_paths: Mapping[str, str | Path],
    settings: Mapping[str, Mapping[str, Any]],
    reuse: bool,
) -> tuple[dict[str, h5py.File | None], dict[str, h5py.File]]:
    """Per descriptor, the previous file to reuse groups from (None: nothing to reuse) and the new, temporary one."""
    olds: dict[str, h5py.File | None] = {}
    news: dict[str, h5py.File] = {}
    for dname, path in feature_paths.items():
        source = Path(previous_paths.get(dname, path))
        keep = check_feature_file(source, dname) if reuse else False
        olds[dname] = stack.enter_context(h5py.File(source, "r")) if keep else None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        news[dname] = stack.enter_context(h5py.File(tmp_paths[dname], "w"))
        news[dname].attrs.update({"format": FEATURES_FORMAT, "complete": False, **settings[dname]})
    return olds, news


def _detections(
    image_dir: Path, names: Sequence[str], done: Mapping[str, Mapping[str, str]], max_size: int | None,
    max_keypoints: int, workers: int, progress: bool,
) -> Iterable[_Detected]:
    """The images of ``names``, read and detected in ``workers`` processes, in input order."""
    loader = torch.utils.data.DataLoader(
        _ImageSource(image_dir, names, done, max_size, max_keypoints), batch_size=None,
        num_workers=workers, collate_fn=_as_is, worker_init_fn=_worker_init if workers else None,
        # Forked workers can deadlock on the thread pools (OpenMP, OpenCV) the parent already started.
        multiprocessing_context="spawn" if workers else None,
    )
    return tqdm(loader, total=len(names), desc="features", unit="img", disable=not progress)


def _batches(items: Iterable[_Detected], gather: int, result: ExtractionResult) -> Iterator[list[_Detected]]:
    """The readable images of ``items`` in order, in batches of at least ``gather`` keypoints (the last may
    hold fewer); the unreadable ones are logged and listed in ``result.skipped``."""
    batch: list[_Detected] = []
    held = 0  # keypoints in batch
    for item in items:
        if item.error is not None:
            result.skipped[item.name] = item.error
            logger.warning("skipping %s: %s", item.name, item.error)
            continue
        batch.append(item)
        held += 0 if item.keypoints is None else len(item.keypoints)
        if held >= gather:
            yield batch
            batch, held = [], 0
    yield batch


def extract_features(
    image_dir: str | Path,
    names: Sequence[str],
    descriptors: Mapping[str, Any],
    feature_paths: Mapping[str, str | Path],
    max_size: int | None = None,
    max_keypoints: int = 8192,
    reuse: bool = True,
    workers: int = 0,
    progress: bool = True,
    previous_paths: Mapping[str, str | Path] | None = None,
) -> ExtractionResult:
    """Detect keypoints once per image and describe them with each descriptor.

    Args:
        image_dir: folder the names are relative to.
        names: image names (relative paths with ``/``).
        descriptors: descriptor name (as given to ``create_descriptor``) -> object with
            OpenCV Feature2D's ``compute`` and ``descriptorSize``.
        feature_paths: descriptor name -> output ``features.h5`` path (same keys).
        max_size: longer image side, in pixels, for detection and description (None: full
            resolution); keypoints are stored in original-resolution pixels.
        max_keypoints: the detector's limit per image (strongest kept).
        reuse: copy unchanged images from existing complete files of the same descriptor.
        workers: processes that read, decode and detect (0: in this process); the results
            do not depend on it.
        progress: show a progress bar (on stderr).
        previous_paths: descriptor name -> the file to reuse groups from, when it is not the
            output itself (a part file of a multi-process run reuses from the final file).

    Returns:
        An :class:`ExtractionResult`. Unreadable images are skipped, logged and listed.

    Raises:
        exemplar_desc.formats.hloc.OutputConflictError: an existing file belongs to another
            descriptor or program (pass ``reuse=False`` to replace it).
    """
    if set(descriptors) != set(feature_paths):
        raise ValueError("descriptors and feature_paths must have the same keys")
    settings = {d: _settings(d, descriptors[d], max_size, max_keypoints) for d in descriptors}
    # Keypoints to gather before describing: a network batch of the largest batching descriptor.
    gather = max((d.batch_size for d in descriptors.values() if isinstance(d, ExemplarDescriptor)), default=0)
    result = ExtractionResult(num_keypoints={d: {} for d in descriptors})
    tmp_paths = {d: Path(str(p) + ".tmp") for d, p in feature_paths.items()}
    try:
        with ExitStack() as stack:
            olds, news = _open_files(stack, feature_paths, tmp_paths, previous_paths or {}, settings, reuse)
            done = {d: {n: sha1 for n in names if (sha1 := _reusable_sha1(olds[d], n, settings[d]))} for d in descriptors}
            items = _detections(Path(image_dir), names, done, max_size, max_keypoints, workers, progress)
            for batch in _batches(items, gather, result):
                _write_batch(batch, descriptors, olds, news, settings, result)
            for out in news.values():
                out.attrs["complete"] = True
    except BaseException:
        for tmp in tmp_paths.values():
            tmp.unlink(missing_ok=True)
        raise
    for dname, path in feature_paths.items():
        os.replace(tmp_paths[dname], path)
    return result


def merge_extraction_results(names: Sequence[str], parts: Sequence[ExtractionResult]) -> ExtractionResult:
    """One :class:`ExtractionResult` from those of disjoint shares of ``names``, in the order of ``names``."""
    order = {name: i for i, name in enumerate(names)}

    def in_order(items):
        return sorted(items, key=lambda item: order[item[0] if isinstance(item, tuple) else item])

    return ExtractionResult(
        names=in_order(n for part in parts for n in part.names),
        skipped=dict(in_order(item for part in parts for item in part.skipped.items())),
        reused=in_order(n for part in parts for n in part.reused),
        num_keypoints={d: dict(in_order(item for part in parts for item in part.num_keypoints[d].items()))
                       for d in parts[0].num_keypoints},
    )


def extract_features_across_ranks(
    dist: Distributed,
    image_dir: str | Path,
    names: Sequence[str],
    descriptors: Mapping[str, Any],
    part_paths: Callable[[int], Mapping[str, str | Path]],
    feature_paths: Mapping[str, str | Path],
    **kwargs: Any,
) -> ExtractionResult:
    """:func:`extract_features` split across the ranks of a torchrun job.

    Each rank extracts its share of ``names`` (:meth:`Distributed.shard`) into its part
    files; rank 0 then merges every rank's parts into ``feature_paths`` (images in the
    order of ``names``) while the others wait, so the merged files equal one process's.

    Args:
        dist: this process's place in the job.
        part_paths: rank -> descriptor name -> that rank's part file.
        feature_paths: descriptor name -> merged ``features.h5``.
        image_dir, names, descriptors, kwargs: as for :func:`extract_features`
            (``previous_paths`` names the files to reuse unchanged images from).

    Returns:
        The :class:`ExtractionResult` of all ranks, the same on every rank.

    Raises:
        exemplar_desc.distributed.DistributedError: a rank failed or was lost (named).
    """
    mine = dist.run("extracting features", lambda: extract_features(
        image_dir, dist.shard(names), descriptors, part_paths(dist.rank), progress=dist.is_main, **kwargs))
    result = merge_extraction_results(names, dist.all_gather_object(mine))

    def merge() -> None:
        if dist.is_main:
            for d, path in feature_paths.items():
                merge_parts([part_paths(rank)[d] for rank in range(dist.world_size)], path, result.names)

    dist.run("merging the features", merge)
    return result
