"""Bad inputs, re-runs and interrupted runs of the SfM pipeline and CLI."""

from __future__ import annotations

import hashlib
import json
import os

import cv2
import h5py
import numpy as np
import pytest
import torch

from exemplar_desc import extraction
from exemplar_desc.registry import create_descriptor
from exemplar_desc.model_io import load_model, save_model
from exemplar_desc.sfm.__main__ import main
from exemplar_desc.extraction import extract_features
from exemplar_desc.formats.hloc import OutputConflictError, check_feature_file
from exemplar_desc.sfm.pipeline import SFM_EXEMPLAR_RATIO, SfmError, SfmSettings, run_sfm

from .synth import texture, write_views

FAST = ["--descriptor", "sift", "--max-size", "200", "--max-keypoints", "300"]


def _digest(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_missing_and_empty_folder(tmp_path, capsys):
    # A bad path: exit status 2, like every bad option.
    assert main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert main(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "no images in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_single_image(tmp_path, capsys):
    write_views(tmp_path / "one", ["only.png"])
    assert main(["--images", str(tmp_path / "one"), "--out", str(tmp_path / "out"), *FAST]) == 1
    assert "single image (only.png)" in capsys.readouterr().err


def test_unreadable_and_truncated_images_are_skipped_named_and_counted(tmp_path, capsys):
    images = tmp_path / "images"
    write_views(images, ["a.png", "b.png", "c.png"])
    good = cv2.imencode(".jpg", texture(300, 400, seed=5))[1].tobytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])  # OpenCV alone would decode this
    (images / "garbage.png").write_bytes(b"this is not a png")
    (images / "empty.jpg").write_bytes(b"")
    code = main(["--images", str(images), "--out", str(tmp_path / "out"), *FAST])
    out = capsys.readouterr().out
    assert code in (0, 3)
    assert "6 found, 3 readable, 3 skipped" in out
    for name in ("truncated.jpg", "garbage.png", "empty.jpg"):
        assert f"skipped {name}:" in out
    assert "truncated JPEG" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(summary["images_skipped"]) == ["empty.jpg", "garbage.png", "truncated.jpg"]
    with h5py.File(tmp_path / "out" / "features.h5", "r") as f:
        assert sorted(f.keys()) == ["a.png", "b.png", "c.png"]
    assert (tmp_path / "out" / "pairs.txt").read_text().count("\n") == 3


def test_only_one_readable_image(tmp_path):
    images = tmp_path / "images"
    write_views(images, ["a.png"])
    (images / "b.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(SfmError, match=r"1 readable image.*skipped 1: b.jpg"):
        run_sfm(images, tmp_path / "out", ["sift"], SfmSettings(max_size=200, max_keypoints=300))


def test_images_without_matches(tmp_path, capsys):
    images = tmp_path / "flat"
    images.mkdir()
    for name in ("a.png", "b.png"):  # featureless: no keypoints, so no matches
        cv2.imwrite(str(images / name), np.full((120, 160), 128, np.uint8))
    assert main(["--images", str(images), "--out", str(tmp_path / "out"), *FAST]) == 1
    assert "no matches between any two of the 2 images" in capsys.readouterr().err


def test_unrelated_images_give_no_model_and_say_so(tmp_path, capsys):
    images = tmp_path / "unrelated"
    images.mkdir()
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        cv2.imwrite(str(images / name), texture(300, 400, seed=10 + seed))
    assert main(["--images", str(images), "--out", str(tmp_path / "out"), *FAST]) == 3
    out = capsys.readouterr().out
    assert "the mapper made no model" in out and "--init-min-num-inliers" in out and "--min-model-size" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["verified_pairs"] <= summary["pairs"] == 3
    assert summary["num_models"] == 0 and summary["images_registered"] == 0
    assert summary["images_not_registered"] == ["a.png", "b.png", "c.png"]


def test_output_folder_of_another_descriptor_is_refused_untouched(tmp_path, capsys):
    images = tmp_path / "images"
    write_views(images, ["a.png", "b.png"])
    out = tmp_path / "out"
    extract_features(images, ["a.png", "b.png"], {"sift": create_descriptor("sift")}, {"sift": out / "features.h5"},
                     max_size=200, max_keypoints=300)
    before = _digest(out / "features.h5")
    argv = ["--images", str(images), "--out", str(out), "--descriptor", "rootsift", "--max-size", "200"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "holds features of descriptor 'sift', not 'rootsift'" in err and "--overwrite" in err
    assert _digest(out / "features.h5") == before
    assert sorted(p.name for p in out.iterdir()) == ["features.h5"]
    # A foreign HDF5 file (e.g. hloc's own) is refused too.
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f.create_group("a.png")
    with pytest.raises(OutputConflictError, match="not written by exemplar_desc.sfm"):
        check_feature_file(tmp_path / "foreign.h5", "sift")


NAMES3 = ["a.png", "sub/b.png", "sub/c.png"]


def test_rerun_reuses_unchanged_images_only(tmp_path):
    images = tmp_path / "images"
    write_views(images, NAMES3)
    path = tmp_path / "features.h5"
    desc = {"sift": create_descriptor("sift")}
    first = extract_features(images, NAMES3, desc, {"sift": path}, max_size=200, max_keypoints=300)
    assert first.reused == []
    with h5py.File(path, "r") as f:
        kp_a = f["a.png"]["keypoints"][()]
    again = extract_features(images, NAMES3, desc, {"sift": path}, max_size=200, max_keypoints=300)
    assert again.reused == NAMES3
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["a.png"]["keypoints"][()], kp_a)
    cv2.imwrite(str(images / "sub" / "b.png"), texture(300, 400, seed=99))  # changed content
    changed = extract_features(images, NAMES3, desc, {"sift": path}, max_size=200, max_keypoints=300)
    assert changed.reused == ["a.png", "sub/c.png"]
    other_size = extract_features(images, NAMES3, desc, {"sift": path}, max_size=150, max_keypoints=300)
    assert other_size.reused == []  # different settings: extracted again


def test_rerun_with_another_exemplar_model_or_magnification_extracts_again(tmp_path, random_model):
    images = tmp_path / "images"
    write_views(images, NAMES3)
    path = tmp_path / "features.h5"

    def run(model, magnification):
        desc = {"exemplar": create_descriptor(f"exemplar:{model}", magnification=magnification)}
        return extract_features(images, NAMES3, desc, {"exemplar": path}, max_size=200, max_keypoints=100)

    run(random_model, 6.0)
    assert run(random_model, 6.0).reused == NAMES3
    assert run(random_model, 8.0).reused == []  # same name, other patches
    # Same name and magnification, other weights (a retrained model).
    net, card = load_model(random_model)
    with torch.no_grad():
        net.head.projection.mul_(-1)
    other = save_model(net, {k: card[k] for k in ("architecture", "patch_size", "magnification", "head")}, tmp_path / "other", card["name"])
    assert run(other, 8.0).reused == []
    with h5py.File(path, "r") as f:
        assert f"sha256 {json.loads(other.read_text())['sha256']}" in f["a.png"].attrs["descriptor_identity"]


@pytest.mark.parametrize("value, message", [
    ("0", "--magnification 0.0: must be a finite number > 0"),
    ("-1", "--magnification -1.0: must be a finite number > 0"),
    ("big", "--magnification 'big': must be sfm, card or a number > 0"),
])
def test_cli_refuses_bad_magnification(tmp_path, capsys, value, message):
    assert main(["--images", str(tmp_path), "--out", str(tmp_path / "out"), "--magnification", value]) == 2
    assert message in capsys.readouterr().err


def test_cli_magnification_card_uses_the_model_card(tmp_path, random_model):
    images = tmp_path / "images"
    write_views(images, NAMES3)
    out = tmp_path / "out"
    main(["--images", str(images), "--out", str(out), "--descriptor", f"exemplar:{random_model}",
          "--max-size", "200", "--max-keypoints", "100", "--magnification", "card"])
    card = json.loads(random_model.read_text())
    with h5py.File(out / "features.h5", "r") as f:
        assert f"magnification {card['magnification']:g}," in f["a.png"].attrs["descriptor_identity"]


def test_the_sfm_magnification_describes_without_the_cards_smallest_patch_side(tmp_path, random_model):
    # A card's floor is chosen at its own magnification; the SfM geometry (magnification 5) keeps none.
    net, card = load_model(random_model)
    floored = save_model(net, {**{k: card[k] for k in ("architecture", "patch_size", "magnification", "head", "int8")},
                               "min_patch_side": 40.0}, tmp_path / "floored", "floored")
    assert SfmSettings().min_patch_side == extraction.resolve_min_patch_side("sfm") == 0
    assert extraction.resolve_min_patch_side("card") is extraction.resolve_min_patch_side(7.0) is None
    images = tmp_path / "images"
    write_views(images, NAMES3)
    for value in ("sfm", "card"):
        out = tmp_path / value
        main(["--images", str(images), "--out", str(out), "--descriptor", f"exemplar:{floored}", "--max-size", "200",
              "--max-keypoints", "100", "--magnification", value, "--precision", "fp32"])
        with h5py.File(out / "features.h5", "r") as f:
            identity = f["a.png"].attrs["descriptor_identity"]
        assert ("min patch side 40," in identity) == (value == "card"), identity


def test_ratio_auto_applies_the_exemplar_ratio_to_exemplar_descriptors_only():
    auto = SfmSettings()
    assert auto.ratio == "auto"
    assert auto.ratio_for("exemplar") == auto.ratio_for("exemplar:exemplar-fast") == SFM_EXEMPLAR_RATIO
    assert auto.ratio_for("sift") is None and auto.ratio_for("rootsift") is None
    assert SfmSettings(ratio=None).ratio_for("exemplar") is None
    assert SfmSettings(ratio=0.8).ratio_for("sift") == SfmSettings(ratio=0.8).ratio_for("exemplar") == 0.8


@pytest.mark.parametrize("option, expected", [([], SFM_EXEMPLAR_RATIO), (["--ratio", "off"], 0.0), (["--ratio", "0.7"], 0.7)])
def test_cli_ratio_reaches_the_exemplar_matches(tmp_path, random_model, option, expected):
    images = tmp_path / "images"
    write_views(images, NAMES3)
    out = tmp_path / "out"
    main(["--images", str(images), "--out", str(out), "--descriptor", f"exemplar:{random_model}",
          "--max-size", "200", "--max-keypoints", "100", *option])
    with h5py.File(out / "matches.h5", "r") as f:
        assert f.attrs["ratio"] == pytest.approx(expected)
    assert json.loads((out / "summary.json").read_text())["ratio"] == (pytest.approx(expected) if expected else None)


def test_cli_refuses_colmap_export_of_a_descriptor_that_is_not_128_d(tmp_path, capsys):
    images = tmp_path / "images"
    write_views(images, NAMES3)
    out = tmp_path / "out"
    argv = ["--images", str(images), "--out", str(out), "--descriptor", "exemplar:exemplar-fast-t005-d256", "--export-colmap"]
    assert main(argv) == 2
    assert "--export-colmap 'exemplar:exemplar-fast-t005-d256': COLMAP's feature files hold 128-D" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_a_ratio_that_is_not_a_number(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--out", str(tmp_path / "out"), "--ratio", "strict"])
    assert "'auto' or 'off'" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


def test_interrupted_run_keeps_previous_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_views(images, ["a.png", "b.png", "c.png"])
    path = tmp_path / "features.h5"
    desc = {"sift": create_descriptor("sift")}
    extract_features(images, ["a.png", "b.png"], desc, {"sift": path}, max_size=200, max_keypoints=300)
    before = _digest(path)
    original = extraction._describe

    def failing(descriptor, image, keypoints, scale):
        if failing.calls == 1:
            raise _Interrupt("killed")
        failing.calls += 1
        return original(descriptor, image, keypoints, scale)

    failing.calls = 0
    monkeypatch.setattr(extraction, "_describe", failing)
    cv2.imwrite(str(images / "a.png"), texture(300, 400, seed=7))  # forces work on a.png and c.png
    with pytest.raises(_Interrupt):
        extract_features(images, ["a.png", "b.png", "c.png"], desc, {"sift": path}, max_size=200, max_keypoints=300)
    assert _digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["features.h5", "images"]
    # A file without the completeness mark is never reused.
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    assert check_feature_file(path, "sift") is False


def test_interrupted_matching_keeps_previous_matches_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from exemplar_desc.sfm import pair_matching

    images = tmp_path / "images"
    write_views(images, ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    names = ["a.png", "b.png", "c.png"]
    extract_features(images, names, {"sift": create_descriptor("sift")}, {"sift": out / "features.h5"},
                     max_size=200, max_keypoints=300)
    pairs = [("a.png", "b.png"), ("a.png", "c.png"), ("b.png", "c.png")]
    pair_matching.match_pairs(out / "features.h5", pairs, out / "matches.h5")
    before = _digest(out / "matches.h5")
    original = pair_matching.match_descriptors

    def failing(*args, **kwargs):
        if failing.calls == 1:
            raise _Interrupt("killed")
        failing.calls += 1
        return original(*args, **kwargs)

    failing.calls = 0
    monkeypatch.setattr(pair_matching, "match_descriptors", failing)
    with pytest.raises(_Interrupt):
        pair_matching.match_pairs(out / "features.h5", pairs, out / "matches.h5")
    assert _digest(out / "matches.h5") == before
    assert sorted(os.listdir(out)) == ["features.h5", "matches.h5"]
