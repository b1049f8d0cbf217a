"""The structure-from-motion pipeline: features -> pairs -> matches -> COLMAP models -> summary.

Output folder of one descriptor::

    features.h5   hloc layout (see sfm.features)      pairs.txt     one "name0 name1" per line
    matches.h5    hloc layout (see sfm.matching)      database.db   COLMAP database
    sparse/<i>/   every model, COLMAP binary format   summary.json  numbers and timings
    colmap_features/<image>.txt  (with export_colmap) input for ``colmap feature_importer``

With several descriptors (a comparison) each gets ``out_dir/<descriptor>/`` and
``out_dir/comparison.json`` lists their summaries; all describe the same keypoints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_write
from ..baselines import create_descriptor
from ..images import list_images
from .export import export_colmap_text
from .features import check_feature_file, extract_features
from .matching import match_pairs
from .pairs import make_pairs, parse_pairs_spec, write_pairs
from .reconstruction import MapperSettings, build_database, model_statistics, run_mapper, verify_pairs

logger = logging.getLogger(__name__)

__all__ = ["SfmError", "SfmSettings", "expand_compare", "run_sfm"]


class SfmError(RuntimeError):
    """The input cannot give a reconstruction (no images, a single image, ...); the message says why."""


#: Default patch magnification of the Exemplar descriptors in SfM (see :class:`SfmSettings`).
SFM_MAGNIFICATION = 5.0


@dataclass
class SfmSettings:
    """Everything but the folders and descriptors.

    Attributes:
        pairs: ``"exhaustive"`` or ``"sequential:K"``.
        max_size: longer side in pixels for feature extraction (None: full resolution).
        max_keypoints: detector limit per image.
        ratio: Lowe ratio for matching (None: mutual nearest neighbours only).
        device: torch device for descriptors and matching.
        mapper: incremental mapper options.
        overwrite: replace outputs of another descriptor or program instead of refusing.
        export_colmap: also write COLMAP feature-import text files.
        focal_length: focal length in pixels of the original images for every camera, as a
            prior (None: from EXIF, else COLMAP's 1.2 x the longer side).
        magnification: patch side / ``KeyPoint.size`` of the Exemplar descriptors (None: the
            model card's). The default, 5, is well under the shipped card's 12: the larger
            patch matches better under blur, but a reconstruction needs precisely placed
            matches. Smaller patches trade 3D points for a lower reprojection error (README,
            "Why magnification 5 in SfM").
    """

    pairs: str = "exhaustive"
    max_size: int | None = None
    max_keypoints: int = 8192
    ratio: float | None = None
    device: str = "cpu"
    mapper: MapperSettings = field(default_factory=MapperSettings)
    overwrite: bool = False
    export_colmap: bool = False
    focal_length: float | None = None
    magnification: float | None = SFM_MAGNIFICATION


def _create_extractor(name: str, settings: SfmSettings) -> Any:
    if name == "exemplar" or name.startswith("exemplar:"):
        return create_descriptor(name, device=settings.device, magnification=settings.magnification)
    return create_descriptor(name, device=settings.device)


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


def run_sfm(
    image_dir: str | Path,
    out_dir: str | Path,
    descriptors: Sequence[str] = ("exemplar",),
    settings: SfmSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the pipeline on a folder of images with one or more descriptors.

    Args:
        image_dir: folder of photos (searched recursively).
        out_dir: output folder; with one descriptor the files go straight into it, with
            several into ``out_dir/<descriptor>/``.
        descriptors: names for ``create_descriptor`` (``"sift"``, ``"rootsift"``,
            ``"exemplar"``, ``"exemplar:<model>"``), all on the same SIFT keypoints.
        settings: see :class:`SfmSettings`.

    Returns:
        Descriptor name -> summary (also written to each folder's ``summary.json``): image
        counts and skipped files, matching and verification counts, ``models`` (statistics of
        every model, largest first, see ``model_statistics``), the largest model's
        ``images_registered``, ``points3D``, ``mean_track_length`` and
        ``mean_reprojection_error`` (pixels; None without a model), and ``seconds`` per stage
        (``features`` covers detection and every descriptor of the run).

    Raises:
        FileNotFoundError, ValueError: missing image folder, no images, bad ``pairs``.
        OutputConflictError: an output folder holds another descriptor's or program's files.
        SfmError: fewer than two readable images, or no matches between any two images.
    """
    settings = settings or SfmSettings()
    parse_pairs_spec(settings.pairs)
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    names = list_images(image_dir)
    if len(names) < 2:
        raise SfmError(f"{image_dir} holds a single image ({names[0]}); structure from motion needs at least two")
    folders = {d: out_dir / d.replace(":", "_").replace("/", "_") if len(descriptors) > 1 else out_dir for d in descriptors}
    if not settings.overwrite:
        for dname, folder in folders.items():
            check_feature_file(folder / "features.h5", dname)
    extractors = {d: _create_extractor(d, settings) for d in descriptors}

    start = time.perf_counter()
    extraction = extract_features(
        image_dir,
        names,
        extractors,
        {d: folder / "features.h5" for d, folder in folders.items()},
        max_size=settings.max_size,
        max_keypoints=settings.max_keypoints,
        reuse=not settings.overwrite,
    )
    extraction_seconds = time.perf_counter() - start
    readable = extraction.names
    skipped = ", ".join(f"{n} ({why})" for n, why in extraction.skipped.items())
    if len(readable) < 2:
        raise SfmError(
            f"{len(readable)} readable image(s) in {image_dir}; structure from motion needs at least two"
            + (f"; skipped {len(extraction.skipped)}: {skipped}" if skipped else "")
        )
    pairs = make_pairs(readable, settings.pairs)

    summaries = {}
    for dname, folder in folders.items():
        seconds = {"features": extraction_seconds}
        summary: dict[str, Any] = {
            "descriptor": dname,
            "image_dir": str(image_dir),
            "images_found": len(names),
            "images_readable": len(readable),
            "images_skipped": dict(extraction.skipped),
            "images_reused": len(extraction.reused),
            "mean_keypoints": float(np.mean(list(extraction.num_keypoints[dname].values()))),
            "settings": {**asdict(settings), "descriptors": list(descriptors)},
        }
        write_pairs(folder / "pairs.txt", pairs)
        start = time.perf_counter()
        counts = match_pairs(
            folder / "features.h5", pairs, folder / "matches.h5", ratio=settings.ratio, device=settings.device
        )
        seconds["matching"] = time.perf_counter() - start
        summary.update(pairs=len(pairs), pairs_with_matches=sum(c > 0 for c in counts.values()),
                       mean_matches_per_pair=float(np.mean(list(counts.values()))))
        if not any(counts.values()):
            raise SfmError(f"no matches between any two of the {len(readable)} images in {image_dir} ({dname})")

        start = time.perf_counter()
        build_database(
            folder / "database.db", image_dir, readable, folder / "features.h5", folder / "matches.h5", pairs,
            focal_length=settings.focal_length,
        )
        seconds["database"] = time.perf_counter() - start
        start = time.perf_counter()
        summary["verified_pairs"] = verify_pairs(folder / "database.db", folder / "pairs.txt", seed=settings.mapper.seed)
        seconds["verification"] = time.perf_counter() - start
        start = time.perf_counter()
        models = run_mapper(folder / "database.db", image_dir, folder / "sparse", settings.mapper)
        seconds["mapping"] = time.perf_counter() - start

        stats = sorted(
            ({"index": i, "path": str(folder / "sparse" / str(i)), **model_statistics(rec)} for i, rec in models.items()),
            key=lambda s: (-s["images_registered"], -s["points3D"]),
        )
        best = stats[0] if stats else {}
        registered = {n for s in stats for n in s["registered_images"]}
        summary.update(
            models=stats,
            num_models=len(stats),
            images_registered=best.get("images_registered", 0),
            points3D=best.get("points3D", 0),
            mean_track_length=best.get("mean_track_length"),
            mean_reprojection_error=best.get("mean_reprojection_error"),
            images_not_registered=[n for n in readable if n not in registered],
            seconds=seconds,
        )
        if not stats:
            summary["message"] = (
                f"the mapper made no model ({summary['verified_pairs']} verified pairs); try a lower "
                "--init-min-num-inliers or --min-model-size"
            )
            logger.warning("%s: %s", dname, summary["message"])
        if settings.export_colmap:
            export_colmap_text(folder / "features.h5", folder / "colmap_features", readable)
        seconds["total"] = sum(seconds.values())
        _write_json(folder / "summary.json", summary)
        summaries[dname] = summary
    if len(descriptors) > 1:
        _write_json(out_dir / "comparison.json", summaries)
    return summaries
