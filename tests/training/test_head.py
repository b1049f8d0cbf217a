"""The head's PCA fitted on patches at SIFT keypoints of the training images (--pca-source keypoints)."""

import json
import re

import numpy as np
import pytest
import skimage.data
import torch

from exemplar_desc import train as train_module
from exemplar_desc.model_io import load_model
from exemplar_desc.training.head import fit_head_on_keypoints, fit_head_on_surrogates, keypoint_patches
from exemplar_desc.training.config import TrainConfig

#: A run of 8 classes and 2 steps, a 16-D head; --magnification skips the tuning.
TINY = ["--num-classes", "8", "--seeds-per-image", "8", "--samples-per-class", "4", "--batch-size", "16",
        "--pca-patches", "256", "--head-dim", "16", "--device", "cpu", "--threads", "1", "--magnification", "8"]
PHOTOS = ("astronaut", "coffee", "chelsea")


def test_keypoint_patches_are_standardised_and_spread_over_the_images():
    images = [getattr(skimage.data, name)() for name in PHOTOS]  # RGB arrays
    batches = list(keypoint_patches(images, 300, magnification=8, patch_size=32, seed=3))
    assert [len(b) for b in batches] == [100, 100, 100]  # each photo has more than 100 SIFT keypoints
    patches = torch.cat(batches)
    assert patches.shape == (300, 1, 32, 32) and patches.dtype == torch.float32
    assert torch.allclose(patches.mean((1, 2, 3)), torch.zeros(300), atol=1e-4)
    std = patches.std((1, 2, 3))
    assert ((std > 0.95) & (std <= 1 + 1e-4)).all()  # unit variance, less normalize_patches' small epsilon
    again = torch.cat(list(keypoint_patches(images, 300, magnification=8, patch_size=32, seed=3)))
    other = torch.cat(list(keypoint_patches(images, 300, magnification=8, patch_size=32, seed=4)))
    assert torch.equal(patches, again)  # the seed decides which keypoints are drawn
    assert not torch.equal(patches, other)


def test_keypoint_patches_widen_the_smallest_keypoints_to_min_side():
    images = [getattr(skimage.data, name)() for name in PHOTOS]
    plain = torch.cat(list(keypoint_patches(images, 300, magnification=8, seed=3)))
    floored = torch.cat(list(keypoint_patches(images, 300, magnification=8, seed=3, min_side=24)))
    changed = (plain - floored).abs().amax((1, 2, 3)) > 1e-4
    assert 0 < int(changed.sum()) < 300  # keypoints under 3 px (8 x 3 = 24) only, the same ones drawn


def test_keypoint_patches_stop_at_the_count_and_skip_unreadable_files(tmp_path):
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    assert [len(b) for b in keypoint_patches(photos, 250, magnification=8)] == [84, 84, 82]  # ceil(250 / 3) each, then the rest
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    # The unreadable file's share is not made up by the others.
    assert [len(b) for b in keypoint_patches([bad, *photos[:2]], 150, magnification=8)] == [50, 50]


def test_too_few_keypoints_is_a_clear_error(random_model):
    net, _ = load_model(random_model)
    blank = np.full((200, 200), 128, np.uint8)
    with pytest.raises(ValueError, match="gave 0 SIFT keypoints"):
        fit_head_on_keypoints(net, [blank], magnification=8, cfg=TrainConfig(pca_patches=256))


def test_cli_refits_the_head_on_keypoints_and_records_it(folder, tmp_path, capsys, monkeypatch):
    fits = []

    def counted(*args):
        fits.append(args)
        return fit_head_on_surrogates(*args)

    monkeypatch.setattr(train_module, "fit_head_on_surrogates", counted)
    common = [str(folder), *TINY, "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    assert train_module.main([*common, "--name", "surrogate"]) == 0
    assert len(fits) == 1
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"surrogate validation accuracy \d\.\d{3} over 8 classes; magnification 8; the head keeps [\d.]+% of the variance",
                        lines[-1]), lines[-1]
    assert train_module.main([*common, "--resume", "--pca-source", "keypoints", "--name", "keypoints"]) == 0
    assert len(fits) == 1  # the magnification is given: the keypoints PCA alone is fitted
    cards = {name: json.loads((tmp_path / "out" / f"{name}.json").read_text()) for name in ("surrogate", "keypoints")}
    assert cards["surrogate"]["head"]["pca_source"] == "surrogate"
    assert cards["keypoints"]["head"]["pca_source"] == "keypoints"
    assert 0 < cards["keypoints"]["head"]["explained_variance"] <= 1
    nets = {name: load_model(tmp_path / "out" / f"{name}.json")[0] for name in cards}
    trunk = {name: net.trunk.state_dict() for name, net in nets.items()}
    assert all(torch.equal(trunk["surrogate"][k], trunk["keypoints"][k]) for k in trunk["surrogate"])  # same trunk
    assert not torch.allclose(nets["surrogate"].head.projection, nets["keypoints"].head.projection)  # another PCA
