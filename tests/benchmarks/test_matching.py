"""Descriptor registry and a tiny end-to-end benchmark run."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.datasets import write_sequence
from benchmarks.descriptors import (
    MKD_MAGNIFICATION,
    PATCH_MAGNIFICATION,
    KorniaPatchDescriptor,
    as_float,
    build_descriptors,
    catalogue,
)
from benchmarks.matching import OUTPUT_FILES, detect, main
from benchmarks.metrics import HOMOGRAPHY_KEYS
from benchmarks.synthetic import make_sequence, sample_photo

from ..conftest import SHARED_DATA

TORCH_HUB = SHARED_DATA.parent / "peers" / "torch_hub"
MKD_WEIGHTS = TORCH_HUB / "hub" / "checkpoints" / "mkd-concat-64.pth"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Single-threaded torch keeps these tests fast and steady on small, busy machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two small synthetic sequences (first three images of each) in the Oxford layout."""
    root = tmp_path_factory.mktemp("data")
    photo = cv2.resize(sample_photo("astronaut"), (240, 240), interpolation=cv2.INTER_AREA)
    for kind, name in [("zoom+rotation", "tiny-zoom"), ("blur", "tiny-blur")]:
        images, homographies = make_sequence(photo, kind)
        write_sequence(root / name, images[:3], homographies[:3])
    (root / "broken").mkdir()
    return root


def test_unknown_descriptor_lists_available():
    with pytest.raises(ValueError) as err:
        build_descriptors(["sift", "nosuch"])
    message = str(err.value)
    assert "nosuch" in message and "rootsift" in message and "tfeat" in message


def test_unavailable_descriptors_are_listed_with_a_reason():
    names, unavailable = catalogue()
    assert {"sift", "rootsift", "kornia:sift", "tfeat", "hardnet", "sosnet", "hynet", "mkd"} <= set(names)
    assert any(n.startswith("exemplar") for n in names)
    for name, reason in unavailable.items():
        assert name in names and reason
    if not hasattr(cv2, "xfeatures2d"):
        assert "cv2.xfeatures2d" in unavailable["xfeatures2d:daisy"]
    built, skipped = build_descriptors([n for n in names if n.startswith("exemplar")] + ["sift"])
    assert "sift" in built
    assert set(built) | set(skipped) == {n for n in names if n.startswith("exemplar")} | {"sift"}


def test_kornia_sift_descriptor_on_shared_keypoints():
    image = cv2.resize(sample_photo("camera"), (200, 200), interpolation=cv2.INTER_AREA)
    kps, _ = detect(image, "sift", 50)
    descriptor = build_descriptors(["kornia:sift"])[0]["kornia:sift"]
    assert isinstance(descriptor, KorniaPatchDescriptor)
    out, desc = descriptor.compute(image, kps)
    assert len(out) == len(kps) and desc.shape == (len(kps), 128) and desc.dtype == np.float32
    assert np.all(np.isfinite(desc)) and desc.std() > 0
    assert descriptor.magnification == PATCH_MAGNIFICATION
    assert build_descriptors(["kornia:sift"], magnification=7.0)[0]["kornia:sift"].magnification == 7.0


def test_binary_descriptors_are_unpacked_for_l2():
    bits = as_float(np.array([[0b10100000, 1]], dtype=np.uint8), cv2.NORM_HAMMING, 1)
    assert bits.shape == (1, 16) and bits.sum() == 3
    assert as_float(None, cv2.NORM_L2, 4).shape == (4, 0)


def test_mser_ellipses_match_keypoints():
    image = sample_photo("camera")
    kps, ellipses = detect(image, "mser", 100)
    assert 0 < len(kps) <= 100 and ellipses.shape == (len(kps), 5)
    assert [kp.class_id for kp in kps] == list(range(len(kps)))
    np.testing.assert_allclose(ellipses[:, :2], [kp.pt for kp in kps], atol=1e-3)
    assert np.all(ellipses[:, 2] * ellipses[:, 4] - ellipses[:, 3] ** 2 > 0)  # positive definite


def test_end_to_end_sift_rootsift(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--data", str(tiny_data), "--descriptors", "sift,rootsift", "--num-features", "300",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr()
    assert "sift" in printed.out and "rootsift" in printed.out and "mAP" in printed.out
    assert "broken" in printed.err  # the bad folder is named, the others ran
    results = json.loads((out / "results.json").read_text())
    assert set(results["descriptors"]) == {"sift", "rootsift"}
    sift = results["descriptors"]["sift"]
    assert set(sift["sequences"]) == {"tiny-zoom", "tiny-blur"}
    assert list(sift["sequences"]["tiny-blur"]["pairs"]) == ["1-2", "1-3"]
    assert set(sift["per_kind"]) == {"zoom+rotation", "blur"}
    for entry in results["descriptors"].values():
        s = entry["summary"]
        assert 0.3 < s["mAP"] <= 1.0 and 0.3 < s["MMA"][2] <= 1.0 and s["num_pairs"] == 4
        assert s["H_mean"] == pytest.approx(np.mean([s[k] for k in HOMOGRAPHY_KEYS[:-1]]))
        assert entry["magnification"] is None  # SIFT has no patch magnification
        assert s["MMA"] == sorted(s["MMA"])  # accuracy can only grow with the threshold
        assert entry["time_per_keypoint_ms"] > 0
    assert results["protocol"]["num_features"] == 300
    assert results["protocol"]["homography_thresholds"] == [1, 3, 5, 10]
    assert results["protocol"]["homography_fit"]["method"].startswith("MAGSAC++")
    table_header = printed.out.splitlines()[2]
    assert re.search(r"MMA@3\s+H@1px\s+H@3px\s+H@5px\s+H@10px\s+H mean\s+correct", table_header), table_header
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("descriptor,scope,kind,sequence,pair,mAP")
    assert "H@5px,H@10px,H_mean,homography_error" in rows[0]
    assert len(rows) == 1 + 2 * (4 + 2 + 2 + 1)  # per descriptor: 4 pairs, 2 sequences, 2 kinds, overall
    for png in ("mAP.png", "matching_score.png", "MMA_3px.png", "homography_3px.png", "homography_mean.png",
                "mma_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_run_writes_only_under_out(tiny_data, tmp_path, monkeypatch):
    """Benchmarking a shipped model leaves its card and weights, the data and the working folder as they were."""
    from exemplar_desc.model_io import DEFAULT_MODEL, weights_dir

    def files(root: Path, *patterns: str) -> dict[str, tuple[int, int]]:
        paths = sorted(p for pattern in patterns for p in root.glob(pattern))
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}

    def watched():
        return files(weights_dir(), "*.json", "*.pt"), files(tiny_data, "**/*")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXEMPLAR_DESC_CACHE", str(tmp_path / "cache"))
    before = watched()
    assert main(["--data", str(tiny_data), "--descriptors", f"exemplar:{DEFAULT_MODEL},sift", "--num-features", "50",
                 "--out", "out", "--no-progress"]) == 0
    assert watched() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)


def test_precision_reaches_the_exemplar_descriptors_and_the_protocol(tiny_data, tmp_path, random_model, monkeypatch):
    import benchmarks.matching as bench

    built = {}

    def spy(*args, **kwargs):
        descriptors, skipped = build_descriptors(*args, **kwargs)
        built.update(descriptors)
        return descriptors, skipped

    monkeypatch.setattr(bench, "build_descriptors", spy)
    name = f"exemplar:{random_model}"
    assert main(["--data", str(tiny_data), "--descriptors", f"{name},sift", "--precision", "bf16",
                 "--num-features", "100", "--out", str(tmp_path), "--no-progress"]) == 0
    assert built[name].precision == "bf16"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["protocol"]["exemplar_precision"] == {name: "bf16"}
    assert results["descriptors"][name]["summary"]["num_pairs"] == 4


def test_cli_errors(tiny_data, capsys):
    assert main(["--data", str(tiny_data), "--descriptors", "siftt"]) == 2
    assert "available:" in capsys.readouterr().err
    assert main(["--data", str(tiny_data / "absent"), "--descriptors", "sift"]) == 2
    assert main(["--list"]) == 0
    assert "hardnet" in capsys.readouterr().out


@pytest.mark.skipif(not (TORCH_HUB / "hub" / "checkpoints").is_dir(), reason=f"TFeat weights not found in {TORCH_HUB}")
def test_tfeat_loads_from_torch_hub_cache(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(TORCH_HUB))
    built, skipped = build_descriptors(["tfeat"])
    assert "tfeat" in built, skipped
    image = cv2.resize(sample_photo("camera"), (200, 200), interpolation=cv2.INTER_AREA)
    kps, _ = detect(image, "sift", 40)
    _, desc = built["tfeat"].compute(image, kps)
    assert desc.shape == (len(kps), 128) and np.all(np.isfinite(desc))


@pytest.mark.skipif(not MKD_WEIGHTS.is_file(), reason=f"MKD's weights not found at {MKD_WEIGHTS}")
def test_mkd_loads_from_torch_hub_cache(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(TORCH_HUB))
    built, skipped = build_descriptors(["mkd"])
    assert "mkd" in built, skipped
    mkd = built["mkd"]
    assert repr(mkd.module) == ("MKDDescriptor(patch_size=32, kernel_type=concat, whitening=pcawt, "
                                "training_set=liberty, output_dims=128)")
    assert mkd.magnification == MKD_MAGNIFICATION
    image = cv2.resize(sample_photo("camera"), (200, 200), interpolation=cv2.INTER_AREA)
    kps, _ = detect(image, "sift", 40)
    _, desc = mkd.compute(image, kps)
    assert desc.shape == (len(kps), 128) and np.all(np.isfinite(desc))
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)  # MKD's output has unit norm
    assert build_descriptors(["mkd"], magnification=10.0)[0]["mkd"].magnification == 10.0


def test_magnification_reaches_the_kornia_descriptors_and_the_results(tiny_data, tmp_path):
    assert main(["--data", str(tiny_data), "--descriptors", "kornia:sift,sift", "--magnification", "8",
                 "--num-features", "50", "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["protocol"]["magnification"] == 8.0
    assert results["descriptors"]["kornia:sift"]["magnification"] == 8.0
    assert results["descriptors"]["sift"]["magnification"] is None


def test_regions_follow_keypoints_that_lost_their_class_id():
    from benchmarks.matching import _source_indices

    kps = [cv2.KeyPoint(10.0 * i, 5.0, 3.0) for i in range(5)]
    for i, kp in enumerate(kps):
        kp.class_id = i
    assert _source_indices(kps, [kps[3], kps[1]]).tolist() == [3, 1]
    fresh = [cv2.KeyPoint(40.2, 5.0, 3.0), cv2.KeyPoint(0.1, 4.9, 3.0)]  # class_id -1
    assert _source_indices(kps, fresh).tolist() == [4, 0]


def test_the_default_model_is_listed_first():
    from exemplar_desc.model_io import DEFAULT_MODEL, list_models

    names, _ = catalogue()
    exemplar = [n for n in names if n.startswith("exemplar:")]
    assert exemplar[0] == f"exemplar:{DEFAULT_MODEL}"
    assert sorted(exemplar) == sorted(f"exemplar:{m}" for m in list_models())


def test_every_shipped_exemplar_model_is_benchmarked(monkeypatch, random_model):
    """Each model in the weights folder gets a name and is built as an ExemplarDescriptor."""
    import exemplar_desc.model_io as model_io

    monkeypatch.setattr(model_io, "weights_dir", lambda: random_model.parent)
    names, unavailable = catalogue()
    assert names[0] == "exemplar:random-fast" and "exemplar" not in names
    assert not any(n.startswith("exemplar") for n in unavailable)
    built, skipped = build_descriptors(["exemplar:random-fast"])
    assert set(built) == {"exemplar:random-fast"} and not skipped
    image = cv2.resize(sample_photo("camera"), (200, 200), interpolation=cv2.INTER_AREA)
    kps, _ = detect(image, "sift", 40)
    _, desc = built["exemplar:random-fast"].compute(image, kps)
    assert desc.shape == (len(kps), 128) and desc.dtype == np.float32


def test_a_failing_descriptor_is_reported_and_others_still_run(tiny_data, tmp_path):
    from benchmarks.datasets import load_sequences
    from benchmarks.matching import format_table, run_benchmark, summarise, write_outputs

    class Broken:
        def compute(self, image, keypoints):
            raise RuntimeError("boom")

    sequences, _ = load_sequences(tiny_data)
    sift = build_descriptors(["sift"])[0]["sift"]
    results = summarise(run_benchmark(sequences, {"broken": Broken(), "sift": sift}, num_features=100, progress=False))
    assert set(results["errors"]) == {"broken/tiny-blur", "broken/tiny-zoom"}
    assert "boom" in results["errors"]["broken/tiny-blur"]
    assert results["descriptors"]["sift"]["summary"]["num_pairs"] == 4
    assert results["descriptors"]["broken"]["summary"] == {"num_pairs": 0}
    table = format_table(results).splitlines()
    assert table[2].split()[0] == "broken" and set(table[2].split()[1:-1]) == {"-"}
    written = write_outputs(results, tmp_path / "out")
    assert len(written) == len(OUTPUT_FILES) and json.loads((tmp_path / "out" / "results.json").read_text())["errors"]
