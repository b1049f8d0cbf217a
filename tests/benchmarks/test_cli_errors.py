"""Every bad option or path of ``python -m benchmarks.matching``: one ``error:`` line naming the
option, exit status 2, no traceback, no work started and nothing written."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import benchmarks.matching as bench
from benchmarks.datasets import write_sequence
from benchmarks.matching import main

from ..cli_checks import assert_bad_option


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A one-sequence data folder, a file, an output folder with a folder in a result's place."""
    root = tmp_path_factory.mktemp("bench-cli")
    rng = np.random.default_rng(0)
    write_sequence(root / "data" / "tiny", [rng.integers(0, 256, (60, 80), dtype=np.uint8) for _ in range(2)],
                   [np.eye(3), np.eye(3)])
    (root / "afile").write_text("a file, not a folder")
    (root / "blocked" / "results.json").mkdir(parents=True)
    (root / "cache").mkdir()
    for folder in ("kodak24", "mcmaster"):  # a training-photo root with the held-out folders
        (root / "train" / folder).mkdir(parents=True)
        cv2.imwrite(str(root / "train" / folder / "a.png"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    return root


CASES = [
    # (arguments replacing or added to the defaults, option the error line must name)
    (["--out", "{root}/afile"], "--out"),
    (["--out", "{root}/afile/sub"], "--out"),
    (["--out", "{root}/blocked"], "--out"),
    (["--num-features", "0"], "--num-features"),
    (["--num-features", "-5"], "--num-features"),
    (["--num-features", "2.5"], "--num-features"),
    (["--threshold", "-1"], "--threshold"),
    (["--threshold", "0"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "1.2"], "--ratio"),
    (["--descriptors", ""], "--descriptors"),
    (["--descriptors", " , "], "--descriptors"),
    (["--descriptors", "siftt"], "--descriptors"),
    (["--descriptors", "sift,nosuch"], "--descriptors"),
    (["--descriptors", "exemplar:no-such-model"], "--descriptors"),
    (["--data", "{root}/missing"], "--data"),
    (["--data", "{root}/afile"], "--data"),
    (["--download", "oxford"], "--download"),
    (["--magnification", "0"], "--magnification"),
    (["--magnification", "-1"], "--magnification"),
    (["--magnification", "nan"], "--magnification"),
    (["--magnification", "inf"], "--magnification"),
    (["--min-patch-side", "-1"], "--min-patch-side"),
    (["--min-patch-side", "nan"], "--min-patch-side"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--detector", "harris"], "--detector"),
    (["--precision", "fp16"], "--precision"),
    (["--no-data", "--cache", "{root}/afile"], "--cache"),
    (["--validation", "{root}/train"], "--validation"),  # with the default --data
    (["--no-data", "--download", "oxford", "--validation", "{root}/train"], "--validation"),
    (["--no-data", "--validation", "{root}/data"], "--validation"),  # no kodak24/mcmaster folders
    (["--no-data", "--validation", "{root}/missing"], "--validation"),
]


@pytest.mark.parametrize("extra, option", CASES, ids=[" ".join(c[0]).replace("{root}/", "") for c in CASES])
def test_bad_option_is_one_error_line_exit_2_nothing_written(root, extra, option, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started despite a bad option")

    for name in ("build_descriptors", "load_sequences", "run_benchmark", "write_outputs"):
        monkeypatch.setattr(bench, name, no_work)
    monkeypatch.setenv("EXEMPLAR_DESC_CACHE", str(root / "cache"))
    extra = [a.replace("{root}", str(root)) for a in extra]
    data = [] if "--no-data" in extra else ["--data", str(root / "data")]
    argv = [*data, "--descriptors", "sift", "--out", str(root / "out"), "--no-progress",
            *[a for a in extra if a != "--no-data"]]
    assert_bad_option(main, argv, option, extra[-1], capsys, root)  # nothing downloaded, generated or written


@pytest.mark.parametrize("kwargs, message", [
    ({"num_features": 0}, "num_features 0: must be a whole number >= 1"),
    ({"pixel_threshold": -1.0}, "pixel_threshold -1.0: must be a finite number > 0"),
    ({"ratio": 0.0}, "ratio 0.0: must be a finite number > 0 and <= 1"),
    ({"detector": "harris"}, "detector 'harris': must be one of sift, mser"),
    ({"descriptors": {}}, "descriptors {}: no descriptor to run"),
])
def test_run_benchmark_refuses_bad_arguments_before_any_work(root, kwargs, message):
    from benchmarks.datasets import load_sequences

    sequences, _ = load_sequences(root / "data")
    args = {"sequences": sequences, "descriptors": {"sift": object()}, "progress": False, **kwargs}
    with pytest.raises(ValueError) as info:
        bench.run_benchmark(**args)
    assert str(info.value) == message


def test_detect_refuses_zero_features():
    # OpenCV reads nfeatures=0 as "no limit".
    with pytest.raises(ValueError, match="^num_features 0"):
        bench.detect(np.zeros((32, 32), np.uint8), "sift", 0)
