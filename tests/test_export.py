"""The ONNX export: cv2.dnn reads the file and gives ExemplarPatchDescriptor's descriptors; its command line;
the OpenCV-only program of docs/onnx.md against ExemplarDescriptor.compute."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from exemplar_desc import ExemplarDescriptor, ExemplarPatchDescriptor
from exemplar_desc.export import main
from exemplar_desc.model_io import DEFAULT_MODEL, load_model, sha256_of
from exemplar_desc.onnx_export import INPUT_NAME, OUTPUT_NAME, OnnxDescriptorGraph, export_onnx
from exemplar_desc.patches import build_pyramid, extract_patches, gray_tensor, keypoint_frames, keypoints_to_arrays

from .cli_checks import assert_bad_option
from .conftest import shared_data
from .test_recipes import FENCE, REPO, run_block


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The default model as an ONNX file."""
    path = tmp_path_factory.mktemp("onnx") / "exemplar.onnx"
    export_onnx(None, path)
    return path


def run_cv2(path: Path, patches: np.ndarray) -> np.ndarray:
    """(N, D) descriptors of (N, 1, P, P) float32 patches from ``cv2.dnn``."""
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setInput(patches)
    return net.forward()


def assert_same_descriptors(path: Path, model: str | Path | None, patches: np.ndarray) -> np.ndarray:
    """cv2.dnn on the file against ExemplarPatchDescriptor; returns the cosines.

    The two differ by float32 rounding in a different order of operations, about 1e-6 per
    entry of a unit vector; 1e-4 leaves room for other BLAS kernels and is still far below
    any change of the computation (a missing step moves entries by 1e-2 or more).
    """
    with torch.no_grad():
        expected = ExemplarPatchDescriptor(model)(torch.from_numpy(patches)).numpy()
    got = run_cv2(path, patches)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    cosine = (got * expected).sum(1)
    assert cosine.min() > 0.999
    return cosine


def test_cv2_dnn_describes_photo_patches_as_the_patch_descriptor(exported):
    image = cv2.imread(str(shared_data("oxford", "graf", "img1.ppm")))
    keypoints = cv2.SIFT_create(nfeatures=200).detect(image, None)
    xy, size, angle = keypoints_to_arrays(keypoints)
    frames = keypoint_frames(size, angle, float(load_model(None)[1]["magnification"]))
    patches = extract_patches(build_pyramid(gray_tensor(image)), xy, frames).numpy()
    assert 200 <= len(patches) <= 210
    assert_same_descriptors(exported, None, patches)


@pytest.mark.parametrize("n", [1, 257])
def test_dynamic_batch(exported, n):
    patches = np.random.default_rng(n).random((n, 1, 32, 32), dtype=np.float32)
    assert_same_descriptors(exported, None, patches)


def test_metadata_and_signature(exported):
    proto = onnx.load(str(exported))
    card = load_model(None)[1]
    assert {p.key: p.value for p in proto.metadata_props} == {
        "model": DEFAULT_MODEL, "sha256": card["sha256"], "magnification": "10.0", "min_patch_side": "22.0", "patch_size": "32",
        "descriptor_size": "128",
    }
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (inp, out)]
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME) and dims == [["N", 1, 32, 32], ["N", 128]]
    # The operators docs/onnx.md lists: no Sign/Abs (the power after a ReLU), no Shape/Expand of N; the head's
    # pooling is the graph's only pooling.
    pool = {"max": "MaxPool", "avg": "AveragePool"}[card["head"]["pooling"]]
    assert {node.op_type for node in proto.graph.node} - {"Constant"} == {
        "ReduceMean", "ReduceSum", "Sub", "Mul", "Div", "Add", "Sqrt", "Conv", "Relu", pool, "Flatten", "Pow", "MatMul",
        "ReduceL2", "Clip",
    }


@pytest.mark.parametrize("model", ["exemplar-fast-t005-d256", "exemplar-fast-tiny-shaded", "exemplar-fast-64-shaded", "random",
                                   "random-avg"])
def test_other_models(tmp_path, random_model, model):
    # A card path with a head without power compression; the tiny student's 4x4 map, pooled 1x1 per cell; the pruned
    # student's 64 channels; the same card with a head that pools by the mean (an AveragePool in the graph).
    if model.startswith("random"):
        card = json.loads(random_model.read_text())
        card["head"]["pooling"] = "max" if model == "random" else "avg"
        card["weights_file"] = str(random_model.with_suffix(".pt"))
        model = tmp_path / f"{model}.json"
        model.write_text(json.dumps(card))
        assert load_model(model)[0].head.pooling == card["head"]["pooling"]
    metadata = export_onnx(model, tmp_path / "m.onnx")
    card = load_model(model)[1]
    assert metadata["model"] == card["name"] and metadata["magnification"] == repr(float(card["magnification"]))
    patches = np.random.default_rng(0).random((64, 1, 32, 32), dtype=np.float32)
    assert_same_descriptors(tmp_path / "m.onnx", model, patches)


def test_a_grid_that_does_not_divide_the_feature_map_is_refused(tmp_path, random_model):
    net, card = load_model(random_model)  # its 8x8 map of 32-pixel patches
    card["head"]["grid"] = 3
    torch.save({**net.state_dict(), "head.mean": torch.zeros(128 * 9), "head.projection": torch.ones(128 * 9, 128)},
               tmp_path / "grid3.pt")
    card.update(weights_file="grid3.pt", sha256=sha256_of(tmp_path / "grid3.pt"))
    (tmp_path / "grid3.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="8x8 feature map .* not a multiple of the 3x3 pooling grid"):
        OnnxDescriptorGraph(tmp_path / "grid3.json")


def test_command_line_writes_the_file_and_replaces_an_existing_one(tmp_path, capsys):
    out = tmp_path / "exemplar.onnx"
    out.write_bytes(b"an older file")
    assert main(["--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == f"{DEFAULT_MODEL} (magnification 10.0, min_patch_side 22.0, patch_size 32, descriptor_size 128) -> {out}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["exemplar.onnx"]  # no temporary file left
    assert run_cv2(out, np.zeros((2, 1, 32, 32), np.float32)).shape == (2, 128)


@pytest.fixture
def corrupted_model(tmp_path, random_model) -> Path:
    """A card whose weights file lost its last bytes."""
    folder = tmp_path / "corrupted"
    folder.mkdir()
    for suffix in (".json", ".pt"):
        data = random_model.with_suffix(suffix).read_bytes()
        (folder / random_model.with_suffix(suffix).name).write_bytes(data[:-100] if suffix == ".pt" else data)
    return folder / random_model.name


@pytest.mark.parametrize(
    "argv, option, value",
    [
        (["--format", "tflite", "--out", "OUT/x.onnx"], "--format", "tflite"),
        (["--format", "onnx", "--out", "OUT"], "--out", "OUT"),
        (["--format", "onnx", "--out", "OUT/x.pb"], "--out", "OUT/x.pb"),
        (["--format", "onnx", "--out", "OUT/x.onnx", "--model", "no-such-model"], "--model", "no-such-model"),
        (["--format", "onnx", "--out", "OUT/x.onnx", "--model", "OUT/none.json"], "--model", "OUT/none.json"),
        (["--format", "onnx", "--out", "OUT/x.onnx", "--model", "CORRUPTED"], "--model", "CORRUPTED"),
    ],
)
def test_bad_options(tmp_path, capsys, corrupted_model, argv, option, value):
    def fill(text: str) -> str:
        return text.replace("CORRUPTED", str(corrupted_model)).replace("OUT", str(tmp_path))

    assert_bad_option(main, [fill(a) for a in argv], option, fill(value), capsys, tmp_path)


def test_missing_onnx_package_is_reported_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert_bad_option(main, ["--format", "onnx", "--out", str(tmp_path / "x.onnx")], "--format", "onnx", capsys, tmp_path)


def test_the_guides_opencv_program_describes_as_compute(exported, tmp_path):
    page = (REPO / "docs" / "onnx.md").read_text()
    assert "python -m exemplar_desc.export --format onnx --out exemplar.onnx" in page  # the file the block reads
    (language, code), = [block for block in FENCE.findall(page) if block[0] == "python"]
    metadata = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    constants = re.search(r"^MAGNIFICATION, MIN_SIDE, PATCH = ([\d.]+), ([\d.]+), (\d+)", code, re.M)
    assert constants and constants.groups() == (metadata["magnification"], metadata["min_patch_side"], metadata["patch_size"])
    image = shared_data("oxford", "graf", "img1.ppm")
    out = tmp_path / "features.npz"
    printed = run_block(language, code, MODEL=exported, IMAGE=image, OUT=out)
    saved = np.load(out)
    keypoints = [cv2.KeyPoint(x, y, size, angle) for x, y, size, angle in saved["keypoints"]]
    assert f"{len(keypoints)} keypoints, descriptors ({len(keypoints)}, 128)" in printed and len(keypoints) >= 2000
    _, expected = ExemplarDescriptor(precision="fp32").compute(cv2.imread(str(image)), keypoints)
    cosine = (saved["descriptors"] * expected).sum(1)
    # The guide's geometry is compute's; what may differ is where cv2.warpAffine puts a sample.
    # OpenCV 5.0.0 puts it exactly (min 0.9999998 measured); OpenCV 4.x rounds it to 1/32
    # pixel, at most 1/64 per axis (min 0.99990, mean 0.99998 measured with 4.10.0). The bounds
    # are what moving every sample of compute's own patches by 1/32 pixel along both axes costs
    # (min 0.9993, mean 0.99986 on these keypoints): twice the worst rounding of OpenCV 4.x.
    assert cosine.min() >= 0.999 and cosine.mean() >= 0.9998, (cosine.min(), cosine.mean())
