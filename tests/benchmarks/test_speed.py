"""The speed CLI on two tiny synthetic images."""

import json
import re

import cv2
import numpy as np
import pytest
import torch

import benchmarks.speed as speed
from benchmarks.speed import main

ROW = re.compile(r"^(small|large)\s+(\d+x\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(?:([\d.]+)\s+(\d+)\s+([\d.]+)x|skipped: (.+))$", re.M)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two seeded synthetic images with texture and corners, as IMAGE:COUNT options."""
    folder = tmp_path_factory.mktemp("speed")
    rng = np.random.default_rng(0)
    specs = []
    for name, (w, h), count in (("small.png", (160, 128), 40), ("large.png", (240, 192), 60)):
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (0, 0), 2.0)
        for _ in range(12):
            x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            cv2.rectangle(img, (x, y), (x + int(rng.integers(6, 20)), y + int(rng.integers(6, 20))), int(rng.integers(0, 256)), -1)
        cv2.imwrite(str(folder / name), img)
        specs.append(f"{folder / name}:{count}")
    return specs


def _rows(out):
    return [m.groups() for m in ROW.finditer(out)]


def test_speed_table_has_every_image_threads_and_variant(capsys, tmp_path, random_model, images, monkeypatch):
    monkeypatch.setattr(speed, "native_bf16", lambda device: False)  # bf16 and int8 show as skipped on any CPU
    monkeypatch.setattr(speed, "int8_available", lambda device: False)
    assert main(["--descriptor", f"exemplar:{random_model}", "--small", images[0], "--large", images[1],
                 "--threads", "1,2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CPU .+; AVX2 (yes|no), AVX512 (yes|no), AVX512-VNNI (yes|no), AVX512-BF16 (yes|no), AMX (yes|no); torch kernels \w+$", out, re.M)
    rows = _rows(out)
    keys = [(r[0], int(r[3]), r[4]) for r in rows]
    assert keys == [(image, t, v) for image in ("small", "large") for t in (1, 2) for v in ("SIFT", "fp32", "bf16", "int8")]
    assert {r[1] for r in rows} == {"160x128", "240x192"}
    for r in rows:
        if r[4] == "bf16":
            assert r[8] and "bfloat16" in r[8]
        elif r[4] == "int8":
            assert r[8] and "AVX2" in r[8]
        else:
            assert float(r[5]) > 0 and int(r[6]) > 0 and 0 < int(r[2]) <= 70
        if r[4] == "SIFT":
            assert r[7] == "1.00"
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["cpu"]) >= {"name", "avx2", "avx512", "vnni", "avx512_bf16", "amx", "torch_kernels"} and result["cpu"]["name"]
    assert [(r["image"], r["threads"], r["variant"]) for r in result["rows"]] == keys
    assert not list(tmp_path.glob(".*.tmp"))


def test_speed_other_descriptors_have_one_variant(capsys, images):
    assert main(["--descriptor", "rootsift", "--small", images[0], "--large", images[1], "--threads", "1",
                 "--repeats", "1"]) == 0
    assert [(r[0], r[4]) for r in _rows(capsys.readouterr().out)] == [("small", "SIFT"), ("small", "-"),
                                                                       ("large", "SIFT"), ("large", "-")]


@pytest.mark.parametrize(
    "args, message",
    [(["--repeats", "0"], "--repeats 0"), (["--threads", "1,x"], "--threads '1,x'"), (["--threads", "0"], "--threads 0"),
     (["--threads", "1,1"], "twice"), (["--variants", "fp16"], "--variants 'fp16'"), (["--device", "tpu"], "--device 'tpu'"),
     (["--small", "img.png"], "IMAGE:COUNT"), (["--small", "img.png:0"], "IMAGE:COUNT"),
     (["--large", "missing.ppm:100"], "no such image file"), (["--descriptor", "nosuch"], "available:"),
     (["--batch-size", "0"], "--batch-size 0")],
)
def test_speed_rejects_bad_options(capsys, images, args, message):
    defaults = ["--small", images[0], "--large", images[1]]
    assert main(defaults + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_speed_names_the_shared_data_when_a_default_is_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "SHARED_DATA", tmp_path)
    assert main(["--descriptor", "sift", "--small", f"{tmp_path / 'none.ppm'}:10"]) == 2
    err = capsys.readouterr().err
    assert "none.ppm" in err and "shared data" in err and err.count("\n") == 1


def test_cpu_levers_rejects_bad_options(capsys, tmp_path):
    from benchmarks.cpu_levers import main as levers

    assert levers(["--image", str(tmp_path / "missing.ppm")]) == 2
    assert levers(["--image", str(tmp_path / "missing.ppm"), "--repeats", "0"]) == 2
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((40, 40), np.uint8))
    assert levers(["--image", str(tmp_path / "img.png"), "--shared"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "missing.ppm" in err[0] and "--repeats 0" in err[1] and "--shared" in err[2] and "--split" in err[2]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_levers_split_times_every_stage_and_the_convolutions_rate(images, capsys, precision):
    from benchmarks.cpu_levers import main as levers

    path = images[0].split(":")[0]
    argv = ["--image", path, "--num-features", "30", "--split", "--shared", "--repeats", "1", "--model", "exemplar-fast-small-distilled"]
    assert levers([*argv, "--precision", precision]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "exemplar-fast-small-distilled" in lines[0] and "1 thread" in lines[0] and f"precision='{precision}'" in lines[0]
    stages = [re.match(r"^(.+?)\s+([\d.]+) ms(?:\s+([\d.]+) GFLOP/s)?$", line) for line in lines[1:]]
    assert all(stages), lines
    names = [m[1] for m in stages]
    # fast-small: 16c4s2-32c3s2-64c3, so the last convolution maps 32 to 64 channels on 8x8 and its
    # im2col product has 9 x 32 = 288 columns and 64 outputs.
    assert names[:3] == ["pyramid", "sampling", "standardisation"]
    assert names[3:6] == ["conv 1 1->16 on 32x32", "conv 2 16->32 on 16x16", "conv 3 32->64 on 8x8"]
    assert names[6] == "head" and re.fullmatch(r"matrix product \d+x288 @ 288x64", names[7])
    assert all(m[3] is not None for m in stages[3:6]) and stages[7][3] is not None and stages[6][3] is None
    assert re.fullmatch(r"conv 1 once per level \(\d levels\)", names[8]) and stages[8][3] is not None
    assert names[9:] == ["sampling conv 1's 16 maps"]


def test_first_conv_at_keypoints_is_the_convolution_of_each_patch():
    from benchmarks.cpu_levers import first_conv_at_keypoints, level_maps
    from exemplar_desc.patches import build_pyramid, extract_patches, keypoint_frames, patch_levels

    image = cv2.GaussianBlur(np.random.default_rng(0).random((200, 240), dtype=np.float32), (0, 0), 1.0)
    pyramid = build_pyramid(image)
    conv = torch.nn.Conv2d(1, 8, 4, stride=2, padding=1).requires_grad_(False)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))
    # Sides 32 and 64 px: steps 1 and 2, so levels 0 and 1, each patch's pixels on its level's pixels
    # and its conv outputs on the level map's (centres chosen for both).
    centers, frames = np.array([[101.5, 81.5], [131.5, 111.5]]), keypoint_frames(np.array([3.2, 6.4]), None, 10.0)
    levels = patch_levels(torch.as_tensor(frames), len(pyramid), 32)
    assert levels.tolist() == [0, 1]
    with torch.no_grad():
        maps = level_maps(conv, pyramid, levels)
        shared = torch.empty(2, 8, 16, 16)
        for idx, outputs in first_conv_at_keypoints(conv, maps, centers, frames, levels, 32):
            shared[idx] = outputs
        per_patch = conv(extract_patches(pyramid, centers, frames, 32))
    # Both grids' float32 rounding moves a sample by at most ~1e-5 pixel (|grid| <= 1, a few operations,
    # maps and levels under 240 px), so an output moves by that times the maps' largest step between
    # neighbours, and a patch pixel by that times the image's (< 1), which the filter weighs by sum |w|.
    step = max(float(torch.diff(m, dim=d).abs().max()) for m in maps.values() for d in (-1, -2))
    bound = 1e-5 * (step + float(conv.weight.abs().sum()))
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the border outputs see the patch's zero padding
    assert float((shared - per_patch)[interior].abs().max()) <= bound
    assert float((shared - per_patch).abs().max()) > 100 * bound


def test_cpu_levers_times_the_onnx_file_in_cv2_dnn_on_the_patches_compute_cuts(images, capsys):
    from benchmarks.cpu_levers import main as levers

    path = images[0].split(":")[0]
    assert levers(["--image", path, "--num-features", "30", "--repeats", "1", "--onnx", "--model", "exemplar-fast-small-distilled"]) == 0
    rows = re.findall(r"^onnx cv2\.dnn\s+(\d+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)$", capsys.readouterr().out, re.M)
    assert sorted(int(r[0]) for r in rows) == sorted({1, torch.get_num_threads()})
    # The same patches through both: float32 rounding in another order, within 1e-4 per entry of a
    # unit 128-vector (tests/test_export.py), so a cosine of at least 1 - 128e-8 / 2 > 0.99999.
    assert all(float(r[3]) >= 0.9999 for r in rows), rows


@pytest.mark.skipif("qnnpack" not in torch.backends.quantized.supported_engines, reason="this torch has no QNNPACK")
def test_cpu_levers_runs_int8_packed_for_arms_engine(images, capsys, random_model):
    from benchmarks.cpu_levers import main as levers

    path = images[0].split(":")[0]
    assert levers(["--image", path, "--num-features", "30", "--repeats", "1", "--qnnpack", "--model", str(random_model)]) == 0
    rows = re.findall(r"^int8 qnnpack\s+(\d+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)$", capsys.readouterr().out, re.M)
    assert sorted(int(r[0]) for r in rows) == sorted({1, torch.get_num_threads()})
    # Near float32's: the cosine of two unrelated unit 128-vectors has standard deviation 1 / sqrt(128) = 0.09,
    # so a median over 30 keypoints above 0.5 is not chance. (The random model's int8 is coarse: min 0.57 on oneDNN too.)
    assert all(float(r[4]) > 0.5 for r in rows), rows
