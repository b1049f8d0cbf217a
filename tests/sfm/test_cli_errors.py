"""Every bad option or path of ``python -m exemplar_desc.sfm``: one ``error:`` line naming the
option, exit status 2, no traceback, no work started and nothing written."""

from __future__ import annotations

import pytest

from exemplar_desc.sfm import pipeline
from exemplar_desc.sfm.__main__ import main

from ..cli_checks import assert_bad_option
from .synth import write_views

FAST = ["--descriptor", "sift", "--max-size", "200", "--max-keypoints", "300"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Images, special folders and a finished output set, shared by the cases."""
    root = tmp_path_factory.mktemp("cli")
    write_views(root / "images", ["a.png", "b.png", "c.png"])
    write_views(root / "collide", ["x-y.png", "x/y.png"])
    write_views(root / "spaces", ["a b.png", "c.png"])
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no image here")
    (root / "afile").write_text("a file, not a folder")
    assert main(["--images", str(root / "images"), "--out", str(root / "out"), *FAST]) == 0
    return root


CASES = [
    # (extra arguments, option the error line must name); {root} is the shared folder.
    (["--out", "{root}/afile"], "--out"),
    (["--out", "{root}/afile/sub"], "--out"),
    (["--images", "{root}/missing"], "--images"),
    (["--images", "{root}/empty"], "--images"),
    (["--images", "{root}/collide"], "--images"),
    (["--images", "{root}/spaces"], "--images"),
    (["--max-size", "0"], "--max-size"),
    (["--max-size", "-5"], "--max-size"),
    (["--max-size", "big"], "--max-size"),
    (["--max-keypoints", "0"], "--max-keypoints"),
    (["--focal-length", "-100"], "--focal-length"),
    (["--focal-length", "0"], "--focal-length"),
    (["--focal-length", "nan"], "--focal-length"),
    (["--ratio", "5"], "--ratio"),
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "nan"], "--ratio"),
    (["--pairs", "bad"], "--pairs"),
    (["--pairs", "sequential:0"], "--pairs"),
    (["--pairs", "sequential:x"], "--pairs"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--magnification", "0"], "--magnification"),
    (["--magnification", "-2"], "--magnification"),
    (["--magnification", "nan"], "--magnification"),
    (["--magnification", "inf"], "--magnification"),
    (["--precision", "fp16"], "--precision"),
    (["--num-threads", "0"], "--num-threads"),
    (["--num-threads", "-2"], "--num-threads"),
    (["--min-model-size", "0"], "--min-model-size"),
    (["--init-min-num-inliers", "0"], "--init-min-num-inliers"),
    (["--abs-pose-min-num-inliers", "-1"], "--abs-pose-min-num-inliers"),
    (["--min-num-matches", "0"], "--min-num-matches"),
    (["--seed", "-2"], "--seed"),
    (["--compare", "unknown"], "--compare"),
    (["--descriptor", "unknown"], "--descriptor"),
    (["--descriptor", ""], "--descriptor"),
    (["--descriptor", "exemplar:no-such-model"], "--descriptor"),
]


@pytest.mark.parametrize("extra, option", CASES, ids=[" ".join(c[0]).replace("{root}/", "") for c in CASES])
def test_bad_option_is_one_error_line_exit_2_nothing_written(root, extra, option, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("feature extraction started despite a bad option")

    monkeypatch.setattr(pipeline, "extract_features", no_work)
    extra = [a.replace("{root}", str(root)) for a in extra]
    argv = ["--images", str(root / "images"), "--out", str(root / "out"), *FAST, *extra]
    assert_bad_option(main, argv, option, extra[-1], capsys, root)  # the finished set in root/out unchanged


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_size": 0}, ValueError, "max_size 0: must be a whole number >= 1"),
    ({"ratio": 1.5}, ValueError, "ratio 1.5: must be a finite number > 0 and <= 1"),
    ({"pairs": "sequential:0"}, ValueError, "pairs 'sequential:0'"),
    ({"mapper": "fast"}, TypeError, "mapper must be a MapperSettings"),
    ({"precision": "int4"}, ValueError, "precision 'int4': must be auto, fp32, bf16, int8"),
])
def test_settings_refuse_bad_values_on_creation(kwargs, error, message):
    with pytest.raises(error) as info:
        pipeline.SfmSettings(**kwargs)
    assert str(info.value).startswith(message)


def test_run_sfm_refuses_bad_arguments_before_writing(root, monkeypatch):
    settings = pipeline.SfmSettings(max_size=200, max_keypoints=300)
    settings.max_keypoints = 0  # changed after creation: run_sfm checks again
    with pytest.raises(ValueError, match=r"^max_keypoints 0: "):
        pipeline.run_sfm(root / "images", root / "new", ["sift"], settings)
    with pytest.raises(TypeError, match="sequence of names"):
        pipeline.run_sfm(root / "images", root / "new", "sift")
    with pytest.raises(ValueError, match=r"^compare 'sift': .*names a descriptor twice"):
        pipeline.run_sfm(root / "images", root / "new", ["sift", "sift"])
    assert not (root / "new").exists()


def test_output_folder_with_a_folder_for_features_h5_is_one_error_line(root, tmp_path, capsys):
    (tmp_path / "out" / "features.h5").mkdir(parents=True)  # HDF5's own message spans lines
    assert main(["--images", str(root / "images"), "--out", str(tmp_path / "out"), *FAST]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "features.h5 exists but is not an HDF5 file" in lines[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["features.h5"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_reaches_the_exemplar_descriptor(random_model, precision):
    name = f"exemplar:{random_model}"
    extractors = pipeline._create_extractors([name, "sift"], pipeline.SfmSettings(precision=precision), "cpu")
    assert extractors[name].precision == precision
