"""The structure-from-motion pipeline: features -> pairs -> matches -> COLMAP models -> summary.

Output folder of one descriptor::

    features.h5   hloc layout (see formats.hloc)      pairs.txt     one "name0 name1" per line
    matches.h5    hloc layout (see formats.hloc)      database.db   COLMAP database
    sparse/<i>/   every model, COLMAP binary format   summary.json  numbers and timings
    colmap_features/<image>.txt  (with export_colmap) input for ``colmap feature_importer``
    manifest.json the entries of the set above (written last)

With several descriptors (a comparison) each gets ``out_dir/<descriptor>/`` and
``out_dir/comparison.json`` lists their summaries; all describe the same keypoints.

One consistent set: the entries that ``out_dir/manifest.json`` lists come from one run and
agree with each other (same images, pairs, models); a folder without ``manifest.json`` holds no
finished set. A run builds all its outputs in ``out_dir/.partial/``; only when every one is
complete does it write ``.partial/manifest.json`` (the commit point) and move the outputs into
place: ``out_dir/manifest.json`` is moved away first, the previous set's entries are replaced
(those the new set lacks are removed), the summaries and ``manifest.json`` come last. A run
interrupted before the commit point leaves the previous set untouched (the next run discards
the unfinished ``.partial/``); one interrupted while moving leaves a committed ``.partial/``,
which the next run moves into place before anything else. Features of unchanged images are
reused from the set in place: :func:`exemplar_desc.extraction.extract_features` reads its ``features.h5``
as the previous file. See docs/sfm-outputs.md.

Under torchrun (``run_sfm(..., dist=...)``) the ranks extract the features of a share of the
images each and match a share of the pairs each, into part files under
``.partial/.ranks/<rank>/``; rank 0 merges them into the files one process writes and does
everything else alone. See docs/distributed-sfm.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..atomic import atomic_write
from ..checks import OptionError, check, check_device, check_number, check_output_dir
from ..descriptor import PRECISION_CHOICES
from ..distributed import Distributed
from ..extraction import SFM_MAGNIFICATION, SFM_MIN_PATCH_SIDE, ExtractionResult, extract_features, extract_features_across_ranks
from ..formats.colmap import COLMAP_DESCRIPTOR_DIM, export_colmap_text
from ..formats.hloc import check_feature_file, merge_parts, pair_key
from ..images import list_images
from ..registry import check_descriptor_name, create_descriptor, is_exemplar
from .pair_matching import match_pairs
from .pairs import check_image_names, make_pairs, parse_pairs_spec, write_pairs
from .reconstruction import (
    MapperSettings,
    SfmError,
    build_database,
    model_statistics,
    remove_database_files,
    run_mapper,
    verify_pairs,
)

logger = logging.getLogger(__name__)

__all__ = ["SfmError", "SfmSettings", "expand_compare", "run_sfm", "MANIFEST", "STAGING_DIR"]

T = TypeVar("T")

#: Lowe ratio the Exemplar descriptors match with in SfM under ``ratio="auto"`` (see :class:`SfmSettings`).
SFM_EXEMPLAR_RATIO = 0.95
#: The file that names the entries of the finished set in an output folder, written last.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "exemplar_desc.sfm.outputs/1"
#: Where a run builds its outputs before moving them into place.
STAGING_DIR = ".partial"
#: Where, under the staging folder, the ranks of a distributed run write their part files.
PARTS_DIR = ".ranks"
_PREVIOUS_MANIFEST = "previous-manifest.json"
# What versions before the manifest wrote; replaced as one set when no manifest names it.
_UNLISTED_OUTPUTS = ("features.h5", "matches.h5", "pairs.txt", "database.db", "sparse", "colmap_features",
                     "summary.json", "comparison.json")
_SUMMARIES = ("summary.json", "comparison.json")


@dataclass
class SfmSettings:
    """Everything but the folders and descriptors; checked on creation (and by :func:`run_sfm`).

    Attributes:
        pairs: ``"exhaustive"`` or ``"sequential:K"`` (K >= 1).
        max_size: longer side in pixels (>= 1) for feature extraction (None: full resolution).
        max_keypoints: detector limit per image (>= 1).
        ratio: Lowe ratio in (0, 1] on top of mutual nearest neighbours, for every descriptor;
            None: mutual nearest neighbours only; ``"auto"`` (default): 0.95 for the Exemplar
            descriptors, so their matches are placed as precisely as SIFT's, and none for SIFT
            and RootSIFT; chosen on the validation set (docs/model-development.md, "SfM
            settings: magnification 5 and ratio 0.95"). :meth:`ratio_for` resolves it.
        device: torch device for descriptors and matching (``cpu``, ``cuda``, ``cuda:N``).
        mapper: incremental mapper options.
        overwrite: replace outputs of another descriptor or program instead of refusing.
        export_colmap: also write COLMAP feature-import text files.
        focal_length: focal length in pixels (> 0) of the original images for every camera, as
            a prior (None: from EXIF, else COLMAP's 1.2 x the longer side).
        magnification: patch side / ``KeyPoint.size`` (> 0) of the Exemplar descriptors (None:
            the model card's); the default is :data:`exemplar_desc.extraction.SFM_MAGNIFICATION`,
            5, which ``python -m exemplar_desc.extract`` describes with too. Smaller patches
            trade 3D points for a lower reprojection error (docs/model-development.md, "SfM
            settings: magnification 5 and ratio 0.95").
        min_patch_side: smallest patch side in pixels (>= 0) of the Exemplar descriptors (None:
            the model card's); the default is
            :data:`exemplar_desc.extraction.SFM_MIN_PATCH_SIDE`, 0, none: a card's floor is
            chosen at the card's magnification.
        precision: convolutions of the Exemplar descriptors, ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"int8"``
            (see :class:`exemplar_desc.ExemplarDescriptor`).
    """

    pairs: str = "exhaustive"
    max_size: int | None = None
    max_keypoints: int = 8192
    ratio: float | str | None = "auto"
    device: str = "cpu"
    mapper: MapperSettings = field(default_factory=MapperSettings)
    overwrite: bool = False
    export_colmap: bool = False
    focal_length: float | None = None
    magnification: float | None = SFM_MAGNIFICATION
    min_patch_side: float | None = SFM_MIN_PATCH_SIDE
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`exemplar_desc.checks.OptionError` (a ValueError) naming the field of the
        first bad setting, its value and what is allowed."""
        parse_pairs_spec(self.pairs)
        if self.max_size is not None:
            check_number("max_size", self.max_size, low=1, integer=True)
        check_number("max_keypoints", self.max_keypoints, low=1, integer=True)
        if self.ratio is not None and self.ratio != "auto":
            check_number("ratio", self.ratio, low=0, low_open=True, high=1)
        check_device("device", self.device)
        if self.focal_length is not None:
            check_number("focal_length", self.focal_length, low=0, low_open=True)
        if self.magnification is not None:
            check_number("magnification", self.magnification, low=0, low_open=True)
        if self.min_patch_side is not None:
            check_number("min_patch_side", self.min_patch_side, low=0)
        check(self.precision in PRECISION_CHOICES, "precision", self.precision, f"must be {', '.join(PRECISION_CHOICES)}")
        if not isinstance(self.mapper, MapperSettings):
            raise TypeError(f"mapper must be a MapperSettings, got {type(self.mapper).__name__}")
        self.mapper.check()

    def ratio_for(self, descriptor: str) -> float | None:
        """The Lowe ratio ``descriptor`` (a name such as ``"sift"`` or ``"exemplar:NAME"``) matches
        with; None for mutual nearest neighbours only."""
        if self.ratio == "auto":
            return SFM_EXEMPLAR_RATIO if is_exemplar(descriptor) else None
        return self.ratio


def _descriptor_field(index: int) -> str:
    """What errors about the ``index``-th descriptor of a run name: the first is the run's
    ``descriptor``, the others are those it is compared with (``compare``)."""
    return "descriptor" if index == 0 else "compare"


def _create_extractors(descriptors: Sequence[str], settings: SfmSettings, device: str) -> dict[str, Any]:
    extractors = {}
    for i, name in enumerate(descriptors):
        try:
            if is_exemplar(name):
                extractors[name] = create_descriptor(name, device=device, magnification=settings.magnification,
                                                    min_patch_side=settings.min_patch_side, precision=settings.precision)
            else:
                extractors[name] = create_descriptor(name, device=device)
        except (ImportError, FileNotFoundError) as err:  # a missing dependency or weights file
            raise OptionError(_descriptor_field(i), name, f"cannot be loaded here ({err})") from err
        size = extractors[name].descriptorSize()
        if settings.export_colmap and size != COLMAP_DESCRIPTOR_DIM:  # refused now, not after the reconstruction
            raise OptionError("export_colmap", name,
                              f"COLMAP's feature files hold {COLMAP_DESCRIPTOR_DIM}-D descriptors; this one is {size}-D")
    return extractors


def expand_compare(descriptor: str, compare: Sequence[str]) -> list[str]:
    """Descriptors of a run: ``descriptor`` first, then ``compare`` with ``"sift"`` meaning SIFT and RootSIFT."""
    names = [descriptor]
    for item in compare:
        for name in ("sift", "rootsift") if item == "sift" else (item,):
            if name not in names:
                names.append(name)
    return names


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def _list_checked_images(image_dir: Path) -> list[str]:
    """The image names of ``image_dir``; OptionError naming ``image_dir`` when there are none or
    two of them cannot be told apart in the output files."""
    try:
        names = list_images(image_dir)
        check_image_names(names)
    except (FileNotFoundError, ValueError) as err:
        raise OptionError("image_dir", str(image_dir), str(err)) from None
    return names


def _remove(path: Path) -> None:
    if path.suffix == ".db":
        remove_database_files(path)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _install(out_dir: Path) -> None:
    """Move the committed set of ``out_dir/.partial`` into place (see the module docstring).

    Safe to repeat after an interruption: entries already moved stay, the others follow.
    """
    staging = out_dir / STAGING_DIR
    entries = json.loads((staging / MANIFEST).read_text())["entries"]
    previous_manifest = staging / _PREVIOUS_MANIFEST
    if (out_dir / MANIFEST).is_file():
        os.replace(out_dir / MANIFEST, previous_manifest)  # from here on no finished set is in place
    if previous_manifest.is_file():
        previous = json.loads(previous_manifest.read_text())["entries"]
    else:
        previous = [name for name in _UNLISTED_OUTPUTS if (out_dir / name).exists()]
    for name in previous:
        if name not in entries:
            _remove(out_dir / name)
    for name in sorted(entries, key=lambda n: n in _SUMMARIES):
        if (staging / name).exists():
            _remove(out_dir / name)
            os.replace(staging / name, out_dir / name)
    os.replace(staging / MANIFEST, out_dir / MANIFEST)
    shutil.rmtree(staging)
    logger.info("outputs in place in %s: %s", out_dir, ", ".join(entries))


def _finish_interrupted_run(out_dir: Path) -> None:
    """Complete the install of a committed ``.partial/``, or discard an unfinished one."""
    staging = out_dir / STAGING_DIR
    if (staging / MANIFEST).is_file():
        logger.warning("%s holds the complete outputs of an interrupted run; moving them into place", staging)
        _install(out_dir)
    elif staging.exists():
        logger.info("discarding the unfinished outputs of an interrupted run in %s", staging)
        shutil.rmtree(staging)


def run_sfm(
    image_dir: str | Path,
    out_dir: str | Path,
    descriptors: Sequence[str] = ("exemplar",),
    settings: SfmSettings | None = None,
    dist: Distributed | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the pipeline on a folder of images with one or more descriptors.

    Every option and path is checked before anything is computed or written. The outputs
    replace the previous ones as one set (see the module docstring).

    Args:
        image_dir: folder of photos (searched recursively).
        out_dir: output folder; with one descriptor the files go straight into it, with
            several into ``out_dir/<descriptor>/``.
        descriptors: names for ``create_descriptor`` (``"sift"``, ``"rootsift"``,
            ``"exemplar"``, ``"exemplar:<model>"``), all on the same SIFT keypoints; the
            first is the run's descriptor, the others are compared with it (errors name them
            ``descriptor`` and ``compare``).
        settings: see :class:`SfmSettings`.
        dist: this rank's place in a torchrun job (see
            :func:`exemplar_desc.distributed.init_distributed`; every rank calls this with
            the same arguments and sees the same folders), None for one process. The ranks
            extract the features of a share of the images each, then match a share of the
            pairs each; rank 0 merges their part files into the ``features.h5`` and
            ``matches.h5`` that one process writes, and alone builds the database, maps,
            writes the summaries and moves the set into place (docs/distributed-sfm.md).

    Returns:
        Descriptor name -> summary (also written to each folder's ``summary.json``): image
        counts and skipped files, matching and verification counts, ``models`` (statistics of
        every model, largest first, see ``model_statistics``), the largest model's
        ``images_registered``, ``points3D``, ``mean_track_length``, ``mean_reprojection_error``
        and ``observation_sigma`` (pixels; None without a model), and ``seconds`` per stage
        (``features`` covers detection and every descriptor of the run). An empty dict on
        the ranks other than 0 of a distributed run, which end after matching.

    Raises:
        OptionError (a ValueError): a bad setting or descriptor name; a missing image folder,
            one without images or with two names that collide in the output files; an
            output folder that cannot be created. It names the argument (``image_dir``,
            ``out_dir``, ``descriptor``, ``compare``) or the :class:`SfmSettings` field.
        TypeError: ``descriptors`` is a single string, ``settings.mapper`` not MapperSettings.
        OutputConflictError: an output folder holds another descriptor's or program's files.
        SfmError: fewer than two readable images, or no matches between any two images.
        DistributedError: another rank failed (its error is named) or the ranks lost contact.
    """
    settings = settings or SfmSettings()
    main = dist is None or dist.is_main
    job = _on_every_rank(dist, "checking the options", lambda: _check_inputs(image_dir, out_dir, descriptors, settings, dist))
    _on_every_rank(dist, "finishing an interrupted run", lambda: _finish_interrupted_run(job.out_dir) if main else None)
    try:
        summaries = _run(job)
        if main:  # the commit point
            entries = sorted(os.listdir(job.staging))
            _write_json(job.staging / MANIFEST, {"format": MANIFEST_FORMAT, "descriptors": list(job.extractors), "entries": entries})
    except BaseException:
        if main:  # the others may still be writing their part files until rank 0 hears of an error
            shutil.rmtree(job.staging, ignore_errors=True)
        raise
    if main:
        _install(job.out_dir)
    return summaries


def _on_every_rank(dist: Distributed | None, what: str, work: Callable[[], T]) -> T:
    """``work()``; in a distributed run, once every rank's has ended (see :meth:`Distributed.run`)."""
    return work() if dist is None else dist.run(what, work)


def _device(settings: SfmSettings, dist: Distributed | None) -> str:
    """Where this process computes: ``settings.device``, or a rank's own GPU (``cuda:LOCAL_RANK``)."""
    return settings.device if dist is None else str(dist.device)


@dataclass
class _Job:
    """The checked inputs of a run, its extractors and this process's place in it.

    Attributes:
        subfolders: descriptor -> output subfolder (``""`` with one descriptor).
        extractors: descriptor -> extractor, on this process's device.
    """

    image_dir: Path
    out_dir: Path
    names: list[str]
    subfolders: dict[str, str]
    extractors: dict[str, Any]
    settings: SfmSettings
    dist: Distributed | None

    @property
    def staging(self) -> Path:
        return self.out_dir / STAGING_DIR

    def part_path(self, rank: int, sub: str, name: str) -> Path:
        """Where ``rank`` writes its part of ``staging/<sub>/<name>``."""
        return self.staging / PARTS_DIR / str(rank) / sub / name


def _check_inputs(
    image_dir: str | Path,
    out_dir: str | Path,
    descriptors: Sequence[str],
    settings: SfmSettings,
    dist: Distributed | None,
) -> _Job:
    """The checks of :func:`run_sfm`, then its extractors."""
    settings.check()
    if isinstance(descriptors, str):
        raise TypeError(f"descriptors must be a sequence of names, got the string {descriptors!r}")
    descriptors = list(descriptors)
    check(len(descriptors) > 0, "descriptor", descriptors, "name at least one descriptor")
    for i, name in enumerate(descriptors):
        check_descriptor_name(_descriptor_field(i), name)
        check(name not in descriptors[:i], "compare", name, "names a descriptor twice")
    image_dir, out_dir = Path(image_dir), check_output_dir("out_dir", out_dir)
    subfolders = {d: d.replace(":", "_").replace("/", "_") if len(descriptors) > 1 else "" for d in descriptors}
    check(len(set(subfolders.values())) == len(subfolders), "compare", descriptors,
          "two descriptors would share one output folder")
    for sub in subfolders.values():
        check_output_dir("out_dir", out_dir / sub)
    names = _list_checked_images(image_dir)
    if len(names) < 2:
        raise SfmError(f"{image_dir} holds a single image ({names[0]}); structure from motion needs at least two")
    if not settings.overwrite:  # refuse another descriptor's or program's files
        for d, sub in subfolders.items():
            check_feature_file(out_dir / sub / "features.h5", d)
    extractors = _create_extractors(descriptors, settings, _device(settings, dist))
    return _Job(image_dir, out_dir, names, subfolders, extractors, settings, dist)


def _extract(job: _Job) -> ExtractionResult:
    """Features of the images into ``staging/<sub>/features.h5`` for every descriptor.

    Unchanged images are reused from the set in place (its ``features.h5`` is read as the
    previous file). In a distributed run each rank extracts its share of the images into a
    part file and rank 0 merges the parts before any rank goes on (the matching reads the
    merged file).
    """
    settings = job.settings
    paths = {d: job.staging / sub / "features.h5" for d, sub in job.subfolders.items()}
    kwargs = {
        "max_size": settings.max_size,
        "max_keypoints": settings.max_keypoints,
        "reuse": not settings.overwrite,
        "previous_paths": {d: job.out_dir / sub / "features.h5" for d, sub in job.subfolders.items()},
    }
    if job.dist is None:
        return extract_features(job.image_dir, job.names, job.extractors, paths, **kwargs)
    return extract_features_across_ranks(
        job.dist, job.image_dir, job.names, job.extractors,
        lambda rank: {d: job.part_path(rank, sub, "features.h5") for d, sub in job.subfolders.items()},
        paths, **kwargs,
    )


def _match(job: _Job, descriptor: str, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Matches of ``pairs`` into ``staging/<sub>/matches.h5`` (``descriptor``'s features in its ``features.h5``).

    In a distributed run each rank matches its share of the pairs into a part file and rank 0
    merges the parts (the other ranks do not wait for that).

    Returns:
        (name0, name1) -> number of matches, in the order of ``pairs``, on every rank.
    """
    sub, ratio = job.subfolders[descriptor], job.settings.ratio_for(descriptor)
    dist, folder, device = job.dist, job.staging / sub, _device(job.settings, job.dist)
    if dist is None:
        return match_pairs(folder / "features.h5", pairs, folder / "matches.h5", ratio=ratio, device=device)
    parts = [job.part_path(rank, sub, "matches.h5") for rank in range(dist.world_size)]
    share = dist.run("matching", lambda: match_pairs(
        folder / "features.h5", dist.shard(pairs), parts[dist.rank], ratio=ratio, device=device
    ))
    counts = {pair: count for part in dist.all_gather_object(share) for pair, count in part.items()}
    if dist.is_main:
        merge_parts(parts, folder / "matches.h5", [pair_key(*pair) for pair in pairs])
    return {pair: counts[pair] for pair in pairs}


def _run(job: _Job) -> dict[str, dict[str, Any]]:
    """The pipeline proper: every output under ``staging``; paths in the summaries under ``out_dir``.

    In a distributed run the ranks other than 0 return an empty dict after the matching.
    """
    start = time.perf_counter()
    extraction = _extract(job)
    extraction_seconds = time.perf_counter() - start
    readable = _readable(job, extraction)
    pairs = make_pairs(readable, job.settings.pairs)
    seconds, counts = {}, {}
    for dname in job.subfolders:
        start = time.perf_counter()
        counts[dname] = _match(job, dname, pairs)
        seconds[dname] = {"features": extraction_seconds, "matching": time.perf_counter() - start}
        if not any(counts[dname].values()):
            raise SfmError(f"no matches between any two of the {len(readable)} images in {job.image_dir} ({dname})")
    if job.dist is not None:
        if not job.dist.is_main:
            return {}
        shutil.rmtree(job.staging / PARTS_DIR)  # merged; not part of the set
    summaries = {d: _reconstruct(job, d, extraction, pairs, counts[d], seconds[d]) for d in job.subfolders}
    if len(summaries) > 1:
        _write_json(job.staging / "comparison.json", summaries)
    return summaries


def _readable(job: _Job, extraction: ExtractionResult) -> list[str]:
    """The images the features were extracted from; SfmError if fewer than two."""
    if len(extraction.names) < 2:
        skipped = ", ".join(f"{n} ({why})" for n, why in extraction.skipped.items())
        raise SfmError(
            f"{len(extraction.names)} readable image(s) in {job.image_dir}; structure from motion needs at least two"
            + (f"; skipped {len(extraction.skipped)}: {skipped}" if skipped else "")
        )
    return extraction.names


def _reconstruct(
    job: _Job,
    descriptor: str,
    extraction: ExtractionResult,
    pairs: list[tuple[str, str]],
    counts: dict[tuple[str, str], int],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The database, verification, models and ``summary.json`` of one descriptor's matches.

    Args:
        counts: (name0, name1) -> number of matches.
        seconds: seconds per stage so far; the later stages and ``total`` are added.

    Returns:
        The summary (see :func:`run_sfm`).
    """
    folder, settings, readable = job.staging / job.subfolders[descriptor], job.settings, extraction.names
    write_pairs(folder / "pairs.txt", pairs)
    summary = _inputs_summary(job, descriptor, extraction, pairs, counts)
    start = time.perf_counter()
    build_database(folder / "database.db", job.image_dir, readable, folder / "features.h5", folder / "matches.h5",
                   pairs, focal_length=settings.focal_length)
    seconds["database"] = time.perf_counter() - start
    start = time.perf_counter()
    summary["verified_pairs"] = verify_pairs(folder / "database.db", folder / "pairs.txt", seed=settings.mapper.seed)
    seconds["verification"] = time.perf_counter() - start
    start = time.perf_counter()
    models = run_mapper(folder / "database.db", job.image_dir, folder / "sparse", settings.mapper)
    seconds["mapping"] = time.perf_counter() - start
    summary.update(_models_summary(job.out_dir / job.subfolders[descriptor], models, readable), seconds=seconds)
    if not models:
        summary["message"] = (f"the mapper made no model ({summary['verified_pairs']} verified pairs); try a lower "
                              "init_min_num_inliers or min_model_size")
        logger.warning("%s: %s", descriptor, summary["message"])
    if settings.export_colmap:
        export_colmap_text(folder / "features.h5", folder / "colmap_features", readable)
    seconds["total"] = sum(seconds.values())
    _write_json(folder / "summary.json", summary)
    return summary


def _inputs_summary(
    job: _Job, descriptor: str, extraction: ExtractionResult, pairs: list[tuple[str, str]], counts: dict[tuple[str, str], int]
) -> dict[str, Any]:
    """The summary's images, settings, pairs and matches of one descriptor."""
    return {
        "descriptor": descriptor,
        "image_dir": str(job.image_dir),
        "images_found": len(job.names),
        "images_readable": len(extraction.names),
        "images_skipped": dict(extraction.skipped),
        "images_reused": len(extraction.reused),
        "mean_keypoints": float(np.mean(list(extraction.num_keypoints[descriptor].values()))),
        "settings": {**asdict(job.settings), "descriptors": list(job.extractors)},
        "pairs": len(pairs),
        "ratio": job.settings.ratio_for(descriptor),
        "pairs_with_matches": sum(c > 0 for c in counts.values()),
        "mean_matches_per_pair": float(np.mean(list(counts.values()))),
    }


def _models_summary(out_dir: Path, models: dict[int, Any], readable: Sequence[str]) -> dict[str, Any]:
    """The summary's models, largest first (paths under the final ``out_dir``), and the largest one's numbers."""
    stats = sorted(
        ({"index": i, "path": str(out_dir / "sparse" / str(i)), **model_statistics(rec)} for i, rec in models.items()),
        key=lambda s: (-s["images_registered"], -s["points3D"]),
    )
    best = stats[0] if stats else {}
    registered = {n for s in stats for n in s["registered_images"]}
    return {
        "models": stats,
        "num_models": len(stats),
        "images_registered": best.get("images_registered", 0),
        "points3D": best.get("points3D", 0),
        "mean_track_length": best.get("mean_track_length"),
        "mean_reprojection_error": best.get("mean_reprojection_error"),
        "observation_sigma": best.get("observation_sigma"),
        "images_not_registered": [n for n in readable if n not in registered],
    }
