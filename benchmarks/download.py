"""Download, verify and unpack the eight sequences of the Oxford affine benchmark.

Each archive ``<base_url>/<name>.tar.gz`` is streamed to a temporary file, checked (it
opens as a tar archive and holds img1..img6 and H1to2p..H1to6p), kept under
``<cache>/.archives/`` with its sha256 recorded in ``<cache>/.archives/sha256.json`` (hidden,
so the cache stays a plain folder of sequences for the loader), and unpacked
into a temporary folder that replaces ``<cache>/<name>`` in one ``os.replace``. A later
call re-verifies a kept archive against the recorded sha256 and downloads again only when
the archive or the unpacked sequence is missing or damaged.

The base URL is the ``base_url`` argument, else ``$EXEMPLAR_DESC_OXFORD_URL``, else
:data:`OXFORD_URL`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from exemplar_desc.atomic import atomic_write

from .datasets import SequenceError, load_sequence

logger = logging.getLogger(__name__)

__all__ = ["OXFORD_SEQUENCES", "OXFORD_URL", "URL_ENV", "DownloadError", "sha256sum", "download_oxford"]

OXFORD_SEQUENCES = ("graf", "wall", "bikes", "trees", "boat", "bark", "leuven", "ubc")
OXFORD_URL = "https://www.robots.ox.ac.uk/~vgg/research/affine/det_eval_files"
URL_ENV = "EXEMPLAR_DESC_OXFORD_URL"
_MEMBER_RE = re.compile(r"^(img[1-6]\.(ppm|pgm|png|jpg)|H1to[2-6]p)$", re.IGNORECASE)
_REQUIRED = [f"img{k}" for k in range(1, 7)] + [f"H1to{k}p" for k in range(2, 7)]


class DownloadError(RuntimeError):
    """A sequence could not be downloaded or its archive failed verification."""


def sha256sum(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wanted_members(archive: Path) -> dict[str, tarfile.TarInfo]:
    """Regular files of the archive named like Oxford images or homographies, by base name.

    Raises:
        DownloadError: not a readable tar archive, or a required file is missing.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile() and _MEMBER_RE.match(Path(m.name).name)}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DownloadError(f"{archive}: not a readable tar archive ({err})") from err
    stems = {name.split(".")[0] for name in members}
    missing = [r for r in _REQUIRED if r not in stems]
    if missing:
        raise DownloadError(f"{archive}: archive lacks {', '.join(missing)}")
    return members


def _fetch(url: str, dest: Path, timeout: float) -> None:
    def download(tmp: str) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)

    atomic_write(dest, download)


def _unpack(archive: Path, dest: Path) -> None:
    members = _wanted_members(archive)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            for name, member in members.items():  # flat copy by base name: no path from the archive is trusted
                with tar.extractfile(member) as src, open(tmp / name, "wb") as out:
                    shutil.copyfileobj(src, out)
        load_sequence(tmp)  # images decode, homographies are 3x3 and invertible
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except SequenceError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: unpacked files fail to load: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def download_oxford(
    cache: str | Path,
    names: tuple[str, ...] | list[str] = OXFORD_SEQUENCES,
    base_url: str | None = None,
    timeout: float = 60.0,
) -> tuple[Path, dict[str, str]]:
    """Fetch, verify and unpack Oxford sequences into ``cache``.

    Args:
        cache: folder that receives ``<name>/`` sequence folders, and ``.archives/`` with the
            archives and ``sha256.json``.
        names: sequences to fetch.
        base_url: URL of the folder holding ``<name>.tar.gz``; default ``$EXEMPLAR_DESC_OXFORD_URL``
            or :data:`OXFORD_URL`.
        timeout: seconds for each network operation.

    Returns:
        ``cache`` (usable as the benchmark's data folder) and ``{name: error}`` for the
        sequences that failed; the others are complete.
    """
    cache = Path(cache)
    archives = cache / ".archives"
    archives.mkdir(parents=True, exist_ok=True)
    base_url = (base_url or os.environ.get(URL_ENV) or OXFORD_URL).rstrip("/")
    record_path = archives / "sha256.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    errors = {}
    for name in names:
        archive = archives / f"{name}.tar.gz"
        try:
            if archive.is_file() and record.get(name) == sha256sum(archive):
                try:
                    load_sequence(cache / name)
                    logger.info("%s: present, archive sha256 verified", name)
                    continue
                except SequenceError:
                    logger.info("%s: archive verified, unpacking again", name)
            else:
                if archive.is_file():
                    logger.warning("%s: kept archive does not match its recorded sha256; downloading again", archive)
                url = f"{base_url}/{name}.tar.gz"
                logger.info("downloading %s", url)
                try:
                    _fetch(url, archive, timeout)
                except OSError as err:  # URLError and HTTPError are OSErrors
                    raise DownloadError(f"{url}: download failed ({err})") from err
                try:
                    _wanted_members(archive)
                except DownloadError:
                    archive.unlink(missing_ok=True)
                    raise
                record[name] = sha256sum(archive)
                atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True)))
            _unpack(archive, cache / name)
        except DownloadError as err:
            logger.error("%s", err)
            errors[name] = str(err)
    return cache, errors
