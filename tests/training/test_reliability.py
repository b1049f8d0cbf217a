"""Training's reliability: STL-10 alone, bit-for-bit seeds, bad options refused before any work,
SIGINT/SIGTERM checkpoints, --resume naming changed options."""

import json
import os
import signal
import time

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from exemplar_desc import train as train_module
from exemplar_desc.training import loop
from exemplar_desc.training.config import TrainConfig
from exemplar_desc.training.loop import train
from exemplar_desc.training.signals import TrainingInterrupted

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
#: A run of 8 classes, 8 steps per epoch, a 16-D head; --magnification skips the tuning.
TINY = ["--num-classes", "8", "--seeds-per-image", "8", "--samples-per-class", "16", "--batch-size", "16",
        "--pca-patches", "256", "--head-dim", "16", "--device", "cpu", "--threads", "1"]


def _rgb(name):
    image = getattr(skimage.data, name)()
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


@pytest.fixture(scope="module")
def stl10(tmp_path_factory):
    """A fake unlabeled_X.bin: the photos resized to 96x96, stored column-major per channel as STL-10 does."""
    images = np.stack([cv2.resize(_rgb(name), (96, 96), interpolation=cv2.INTER_AREA) for name in PHOTOS])
    path = tmp_path_factory.mktemp("stl10") / "unlabeled_X.bin"
    path.write_bytes(np.transpose(images, (0, 3, 2, 1)).tobytes())
    return path


def _run(args, tmp_path, name):
    out = tmp_path / f"out-{name}"
    status = train_module.main([*args, "--workdir", str(tmp_path / f"work-{name}"), "--out-dir", str(out), "--name", "m"])
    return status, out / "m.json"


def test_stl10_alone_trains_and_tunes_the_magnification_on_its_photos(stl10, tmp_path):
    status, card_path = _run(["--stl10", str(stl10), *TINY], tmp_path, "stl")
    assert status == 0
    card = json.loads(card_path.read_text())
    assert card_path.with_suffix(".pt").is_file()
    assert card["training"]["data"] == {"image_folders": [], "stl10": str(stl10)}
    tuning = card["magnification_tuning"]
    assert tuning["images"] == "STL-10 (96x96)" and tuning["pairs"] >= 1
    scores = tuning["mma_by_magnification"]
    assert scores[f"{card['magnification']:g}"] == max(scores.values())


@pytest.fixture(scope="module")
def seed0_card(folder_of_four, tmp_path_factory):
    """Card of an uninterrupted 2-epoch tiny run with --seed 0."""
    status, card_path = _run([str(folder_of_four), *TINY, "--epochs", "2", "--magnification", "8"], tmp_path_factory.mktemp("seed0"), "a")
    assert status == 0
    return json.loads(card_path.read_text())


def test_one_seed_gives_the_same_weights_bit_for_bit(folder_of_four, seed0_card, tmp_path):
    status, card_path = _run([str(folder_of_four), *TINY, "--epochs", "2", "--magnification", "8"], tmp_path, "b")
    assert status == 0
    assert json.loads(card_path.read_text())["sha256"] == seed0_card["sha256"]
    status, card_path = _run([str(folder_of_four), *TINY, "--epochs", "2", "--magnification", "8", "--seed", "1"], tmp_path, "c")
    assert status == 0
    assert json.loads(card_path.read_text())["sha256"] != seed0_card["sha256"]


def test_training_leaves_the_global_generator_alone(folder_of_four, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cfg = TrainConfig(images=(str(folder_of_four),), num_classes=8, seeds_per_image=8, samples_per_class=4, batch_size=16, device="cpu")
    train(cfg, tmp_path / "w", progress=False)
    assert torch.equal(torch.rand(3), expected)


def _signal_after_step(monkeypatch, step: int, signum: int):
    """Make the training loop send ``signum`` to this process right after step ``step``; returns the real step."""
    real_step = loop.train_step

    def step_then_signal(state, *args):
        out = real_step(state, *args)
        if state.step == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    return real_step


def test_sigint_writes_a_checkpoint_and_resume_finishes_the_same_run(folder_of_four, seed0_card, tmp_path, monkeypatch, capsys):
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    real_step = _signal_after_step(monkeypatch, 3, signal.SIGINT)
    args = [str(folder_of_four), *TINY, "--epochs", "2", "--magnification", "8"]
    status, card_path = _run(args, tmp_path, "i")
    err = capsys.readouterr().err
    assert status == 130
    message = err.strip().splitlines()[-1]  # after the progress bars
    assert message.startswith("interrupted by SIGINT at step 3: checkpoint written to ") and "--resume" in message
    assert "Traceback" not in err and not card_path.exists()
    assert torch.load(tmp_path / "work-i" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored

    monkeypatch.setattr(loop, "train_step", real_step)
    status, card_path = _run([*args, "--resume"], tmp_path, "i")
    assert status == 0
    card = json.loads(card_path.read_text())
    assert card["training"]["steps"] == 16
    # The checkpoint carries every generator: the interrupted run ends with the uninterrupted one's weights.
    assert card["sha256"] == seed0_card["sha256"]


def test_sigterm_stops_train_with_a_checkpoint(folder_of_four, tmp_path, monkeypatch):
    _signal_after_step(monkeypatch, 2, signal.SIGTERM)
    cfg = TrainConfig(images=(str(folder_of_four),), num_classes=8, seeds_per_image=8, samples_per_class=16, batch_size=16, device="cpu")
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 2") as info:
        train(cfg, tmp_path / "w", progress=False)
    assert info.value.signum == signal.SIGTERM
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_resume_names_the_changed_options(folder_of_four, tmp_path, capsys):
    args = [str(folder_of_four), *TINY, "--magnification", "8", "--workdir", str(tmp_path / "w"), "--out-dir", str(tmp_path / "o")]
    assert train_module.main(args) == 0
    capsys.readouterr()
    assert train_module.main([*args, "--resume", "--lr", "0.02", "--rotation", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume ")
    assert "--lr 0.01 -> 0.02" in err[0] and "--rotation 20.0 -> 10.0" in err[0]


#: (case, extra arguments with {base} for the fixture's folder, the option the error must name).
BAD_OPTIONS = [
    ("out-dir-file", ["--out-dir", "{base}/a-file"], "--out-dir"),
    ("out-dir-under-file", ["--out-dir", "{base}/a-file/sub"], "--out-dir"),
    ("workdir-file", ["--workdir", "{base}/a-file"], "--workdir"),
    ("head-dim", ["--head-dim", "100000"], "--head-dim"),
    ("head-grid", ["--head-grid", "0"], "--head-grid"),
    ("head-layer", ["--head-layer", "7"], "--head-layer"),
    ("head-layer-negative", ["--head-layer", "-4"], "--head-layer"),
    ("head-power", ["--head-power", "0"], "--head-power"),
    ("whiten", ["--whiten", "1.5"], "--whiten"),
    ("time-budget-0", ["--time-budget", "0"], "--time-budget"),
    ("time-budget-negative", ["--time-budget", "-1"], "--time-budget"),
    ("max-side", ["--max-side", "0"], "--max-side"),
    ("device", ["--device", "gpu"], "--device"),
    ("threads-negative", ["--threads", "-1"], "--threads"),
    ("threads-0", ["--threads", "0"], "--threads"),
    ("magnification-0", ["--magnification", "0"], "--magnification"),
    ("magnification-negative", ["--magnification", "-3"], "--magnification"),
    ("magnification-nan", ["--magnification", "nan"], "--magnification"),
    ("magnification-inf", ["--magnification", "inf"], "--magnification"),
    ("arch", ["--arch", "64x5-128c5"], "--arch"),
    ("num-classes", ["--num-classes", "1"], "--num-classes"),
    ("epochs", ["--epochs", "0"], "--epochs"),
    ("batch-size", ["--batch-size", "0"], "--batch-size"),
    ("samples-per-class", ["--samples-per-class", "-5"], "--samples-per-class"),
    ("pca-patches", ["--pca-patches", "0"], "--pca-patches"),
    ("pca-source", ["--pca-source", "sift"], "--pca-source"),
    ("lr", ["--lr", "0"], "--lr"),
    ("seed", ["--seed", "-1"], "--seed"),
    ("checkpoint-minutes", ["--checkpoint-minutes", "0"], "--checkpoint-minutes"),
    ("stl10-missing", ["--stl10", "{base}/nothing.bin"], "--stl10"),
    ("stl10-size", ["--stl10", "{base}/short.bin"], "--stl10"),
    ("pca-colour", ["--pca-colour", "0.5"], "--pca-colour"),
    ("rotation", ["--rotation", "-1"], "--rotation"),
    ("blur-nan", ["--blur", "nan"], "--blur"),
    ("scale-order", ["--scale", "2,1"], "--scale"),
    ("scale-nan", ["--scale", "nan,1"], "--scale"),
    ("unknown-family", ["--without", "sharpness"], "--without"),
    ("gamma-below-1", ["--gamma", "0.5"], "--gamma"),
    ("shading-nan", ["--shading", "nan"], "--shading"),
    ("shadow-probability", ["--shadow", "1.5"], "--shadow"),
    ("noise-negative", ["--noise", "-0.1"], "--noise"),
    ("seed-scales-zero", ["--seed-scales", "1,0"], "--seed-scales"),
    ("seed-scales-above-1", ["--seed-scales", "2"], "--seed-scales"),
    ("seed-scales-text", ["--seed-scales", "1,half"], "--seed-scales"),
    ("folder-missing", ["{base}/no-such-folder"], "IMAGES"),
    ("resume-missing", ["--resume", "--workdir", "{base}/ckpt/missing"], "--resume"),
    ("resume-garbage", ["--resume", "--workdir", "{base}/ckpt/garbage"], "--resume"),
    ("resume-truncated", ["--resume", "--workdir", "{base}/ckpt/truncated"], "--resume"),
]


@pytest.fixture(scope="module")
def bad_base(tmp_path_factory):
    """A folder with a plain file, a short .bin, and workdirs with missing, garbage and truncated checkpoints."""
    base = tmp_path_factory.mktemp("bad")
    (base / "a-file").write_text("x")
    (base / "short.bin").write_bytes(b"\0" * 1000)
    (base / "ckpt" / "missing").mkdir(parents=True)
    for name, data in (("garbage", b"garbage" * 100), ("truncated", None)):
        (base / "ckpt" / name).mkdir()
        path = base / "ckpt" / name / "checkpoint.pt"
        torch.save({"model": torch.zeros(1000), "config": {}}, path)
        path.write_bytes(data or path.read_bytes()[:600])
    return base


@pytest.mark.parametrize("case, extra, option", BAD_OPTIONS, ids=[case for case, _, _ in BAD_OPTIONS])
def test_bad_option_is_one_error_line_before_any_work(case, extra, option, folder_of_four, bad_base, capsys):
    out, work = bad_base / f"out-{case}", bad_base / f"work-{case}"
    before = sorted(p.relative_to(bad_base) for p in bad_base.rglob("*"))
    args = [str(folder_of_four), *TINY, "--out-dir", str(out), "--workdir", str(work), *(a.format(base=bad_base) for a in extra)]
    started = time.perf_counter()
    try:
        status = train_module.main(args)
    except SystemExit as exit_:  # argparse's own checks (malformed values, unknown choices)
        status = exit_.code
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.relative_to(bad_base) for p in bad_base.rglob("*")) == before  # nothing written
    assert elapsed < 10
