import json
import math
import shutil

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from exemplar_desc import train as train_module
from exemplar_desc.checks import OptionError
from exemplar_desc.training.config import TrainConfig
from exemplar_desc.training.loop import train
from exemplar_desc.training.schedule import lr_at
from exemplar_desc.training.seeds import load_stl10_unlabeled, sample_seeds, seed_pool


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, folder_of_four):
    """The four photos in a subfolder, a grey JPEG, an unreadable one and a text file."""
    folder = tmp_path_factory.mktemp("images")
    shutil.copytree(folder_of_four, folder / "sub")
    cv2.imwrite(str(folder / "camera.jpg"), skimage.data.camera())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_seeds_follow_gradient_energy_and_avoid_duplicates():
    image = np.zeros((200, 200, 3), np.uint8)
    image[100:, :] = 255  # all the structure lies on one horizontal edge
    rng = np.random.default_rng(0)
    contexts = sample_seeds([image], 6, rng, per_image=6, scales=(1.0,))
    assert contexts.shape == (6, 3, 80, 80) and contexts.dtype == torch.uint8
    centre_rows = contexts[:, 0, 24:56, 24:56].float().mean(dim=(1, 2))
    assert torch.all((centre_rows > 0) & (centre_rows < 255))  # every seed patch touches the edge
    with pytest.raises(ValueError, match="usable seed patches"):
        sample_seeds([image], 50, np.random.default_rng(0), per_image=60, scales=(1.0,))


def test_seed_scales_set_the_image_area_a_seed_covers(tmp_path):
    # One dark vertical bar, 20 px wide: a seed at scale s shows it 20 * s px wide.
    image = np.full((400, 400, 3), 255, np.uint8)
    image[:, 190:210] = 0
    cv2.imwrite(str(tmp_path / "bar.png"), image)
    for scales, width in (((1.0,), 20), ((0.5,), 10)):
        cfg = TrainConfig(images=(str(tmp_path),), num_classes=4, seeds_per_image=4, seed_scales=scales, device="cpu")
        contexts = seed_pool(cfg).choose(4)
        dark = (contexts[:, 0, 40] < 128).sum(dim=1)  # dark pixels along each crop's middle row
        assert torch.all((dark - width).abs() <= 1), (scales, dark)
    both = TrainConfig(images=(str(tmp_path),), num_classes=4, seeds_per_image=4, seed_scales=(1.0, 0.5), device="cpu")
    dark = (seed_pool(both).choose(4)[:, 0, 40] < 128).sum(dim=1)
    assert sorted(set(dark.tolist())) == [10, 20]  # seeds taken at both scales


def test_stl10_reader(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    path = tmp_path / "unlabeled_X.bin"
    path.write_bytes(np.transpose(images, (0, 3, 2, 1)).tobytes())  # STL-10 is column-major per channel
    assert np.array_equal(load_stl10_unlabeled(path), images)
    assert len(load_stl10_unlabeled(path, max_images=2)) == 2
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="not an STL-10 binary"):
        load_stl10_unlabeled(path)


def test_lr_schedule_is_the_official_one_rescaled():
    assert lr_at(0.0, 0.01) == 0.01
    assert lr_at(0.5, 0.01) == 0.01
    assert math.isclose(lr_at(0.8, 0.01), 0.004)
    assert math.isclose(lr_at(0.999, 0.01), 0.0001)


def test_tiny_training_run_lowers_the_loss(image_folder, tmp_path, caplog):
    cfg = TrainConfig(
        images=(str(image_folder),), arch="fast", num_classes=16, seeds_per_image=8, samples_per_class=64,
        epochs=3, batch_size=32, lr=0.05, val_per_class=4, seed=0, device="cpu",
    )
    with caplog.at_level("WARNING"):
        result = train(cfg, tmp_path / "run", progress=False)
    assert "skipped 1 unreadable image" in caplog.text and "broken.jpg" in caplog.text
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < math.log(16) - 0.5
    assert log[-1]["val_accuracy"] > 3 / 16  # chance is 1/16
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert result["samples_seen"] == 3 * 16 * 64

    # A finished run's checkpoint keeps only the trunk, so it cannot continue training.
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=True)
    assert "trunk" in state and "model" not in state and "optimizer" not in state
    state["step"], state["samples"] = 2 * 16 * 64 // 32, 2 * 16 * 64
    torch.save(state, ckpt_path)
    with pytest.raises(ValueError, match="cannot continue training"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    # Simulate an interruption after epoch 2: --resume runs exactly the missing epoch.
    model = result["model"]
    state["model"] = model.state_dict()
    state["optimizer"] = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum).state_dict()
    torch.save(state, ckpt_path)
    (tmp_path / "run" / "log.json").write_text(json.dumps(log[:2]))
    resumed = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert [r["epoch"] for r in resumed["log"]] == [1, 2, 3]
    assert resumed["steps"] == 3 * 16 * 64 // 32
    # A finished run resumes without training, whatever the head options (they are fitted afterwards).
    refit = train(TrainConfig(**{**vars(cfg), "whiten": 1.0, "head_power": 1.0, "magnification": 10.0}), tmp_path / "run", resume=True, progress=False)
    assert refit["steps"] == resumed["steps"]
    with pytest.raises(ValueError, match=r"made with other options: lr 0\.05 -> 0\.1;"):
        train(TrainConfig(**{**vars(cfg), "lr": 0.1}), tmp_path / "run", resume=True, progress=False)

    # A checkpoint made on a GPU (a CUDA generator keeps a 16-byte state) refits on the CPU,
    # and the card still names the device that trained it.
    state = torch.load(ckpt_path, weights_only=True)
    state.update(generator=torch.zeros(16, dtype=torch.uint8), generator_device="cuda", device_name="cuda (H200)")
    torch.save(state, ckpt_path)
    with caplog.at_level("WARNING"):
        moved = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert "made on cuda, resuming on cpu" in caplog.text
    assert moved["steps"] == resumed["steps"] and moved["trained_on"] == "cuda (H200)"


@pytest.mark.parametrize("shape, dtype", [((3, 3, 80, 80), torch.uint8), ((4, 3, 64, 64), torch.uint8), ((4, 3, 80, 80), torch.float32)])
def test_given_seeds_not_the_classes_crops_are_refused_before_any_work(image_folder, tmp_path, shape, dtype):
    cfg = TrainConfig(images=(str(image_folder),), num_classes=4, device="cpu")
    with pytest.raises(OptionError, match=r"must be \(4, 3, 80, 80\) torch.uint8") as err:
        train(cfg, tmp_path / "run", progress=False, seeds=torch.zeros(shape, dtype=dtype))
    assert err.value.option == "seeds" and not (tmp_path / "run").exists()


def test_cli_reports_bad_input(tmp_path, capsys):
    assert train_module.main([str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err
    folder = tmp_path / "few"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((64, 64, 3), 128, np.uint8))
    assert train_module.main([str(folder), "--num-classes", "100", "--workdir", str(tmp_path / "w")]) == 2
    assert "usable seed patches" in capsys.readouterr().err
    assert train_module.main([]) == 2
    assert "no training data" in capsys.readouterr().err
