"""Saving and loading descriptor models: a weights file plus a JSON model card.

A model named ``NAME`` is ``NAME.pt`` (tensors only, loaded with
``torch.load(weights_only=True)``, so loading never executes code) and ``NAME.json`` (the
model card: architecture, patch geometry, head, training record, and the sha256 of the
weights file, which the loader verifies).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import torch

from .atomic import atomic_write
from .networks import DescriptorNet, architecture_from_dict

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "weights_dir", "list_models", "resolve_card_path", "save_model", "load_model", "save_torch", "sha256_of"]

#: The model ExemplarDescriptor() loads when none is named.
DEFAULT_MODEL = "exemplar-fast-t005-shaded"
CARD_FORMAT = 1


def weights_dir() -> Path:
    """Folder of the shipped models: ``exemplar_desc/weights`` when installed, ``weights/`` in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "weights", package.parent / "weights"):
        if (candidate / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(f"no weights folder next to {package}; reinstall exemplar_desc")


def list_models() -> list[str]:
    """Names of the shipped models (cards in :func:`weights_dir`), sorted."""
    return sorted(p.stem for p in weights_dir().glob("*.json"))


def resolve_card_path(model: str | os.PathLike | None) -> Path:
    """The card of a shipped model name, or of a path to a card (``.json``) or weights file (``.pt``).

    Raises:
        FileNotFoundError: unknown name or missing file; the message lists the shipped models.
    """
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model)
    if path.suffix in (".json", ".pt"):
        card = path.with_suffix(".json")
        if not card.is_file():
            raise FileNotFoundError(f"model card {card} not found")
        return card
    card = weights_dir() / f"{model}.json"
    if not card.is_file():
        raise FileNotFoundError(f"unknown model {str(model)!r}; shipped models: {', '.join(list_models()) or 'none'}")
    return card


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_torch(path: str | os.PathLike, obj: object) -> None:
    """``torch.save(obj)`` to ``path`` atomically; the bytes depend on ``obj`` alone.

    torch.save on a path names the archive's records after the file, which atomic_write
    makes a random temporary name; saving to memory first keeps identical tensors giving
    identical files (and sha256).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_model(net: DescriptorNet, card: dict, directory: str | os.PathLike, name: str) -> Path:
    """Write ``NAME.pt`` and ``NAME.json`` into ``directory``; returns the card's path.

    ``card`` must hold ``architecture`` (Architecture.to_dict()), ``patch_size``,
    ``magnification`` and ``head`` (``layer``, ``grid``, ``dim``); the weights file name,
    its sha256 and the format version are added here.
    """
    directory = Path(directory)
    weights_path = directory / f"{name}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_torch(weights_path, state)
    card = {**card, "name": name, "format": CARD_FORMAT, "weights_file": weights_path.name, "sha256": sha256_of(weights_path)}
    card_path = directory / f"{name}.json"
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))
    logger.info("saved model %s to %s", name, card_path)
    return card_path


def load_model(model: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[DescriptorNet, dict]:
    """Load a model by shipped name or card/weights path, verifying the weights' sha256.

    Returns:
        (network in eval mode on ``device``, model card dict; ``min_patch_side`` is 0 where a card
        older than that setting lacks it).

    Raises:
        FileNotFoundError: unknown model or missing file.
        ValueError: corrupted, truncated or incompatible weights file, a malformed card, or a
            card without the weights' sha256 (nothing to verify them against: refused, not loaded
            with a warning, since a card written by save_model always holds it).
    """
    card_path = resolve_card_path(model)
    try:
        card = json.loads(card_path.read_text())
        weights_path = card_path.parent / card["weights_file"]
        arch = architecture_from_dict(card["architecture"])
        head = card["head"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"model card {card_path} is malformed: {err}") from err
    if not weights_path.is_file():
        raise FileNotFoundError(f"weights file {weights_path} named by {card_path} is missing")
    if "sha256" not in card:
        raise ValueError(
            f"model card {card_path} lacks the sha256 of its weights, so {weights_path.name} cannot be verified; "
            "save the model with exemplar_desc.model_io.save_model, or add the file's sha256 to the card if you trust it"
        )
    digest = sha256_of(weights_path)
    if digest != card["sha256"]:
        raise ValueError(
            f"weights file {weights_path} is corrupted or truncated: sha256 {digest[:12]}... "
            f"does not match {str(card['sha256'])[:12]}... recorded in {card_path.name}"
        )
    net = DescriptorNet(arch, layer=head["layer"], grid=head["grid"], dim=head["dim"], power=head.get("power", 1.0),
                        pooling=head.get("pooling", "max"))  # cards written before the setting pooled by maximum
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as err:  # torch raises many types for bad files; name the file instead
        raise ValueError(f"cannot load weights file {weights_path}: {err}") from err
    card.setdefault("min_patch_side", 0.0)  # cards written before the setting had no floor
    return net.to(device).eval(), card
