"""--init: a run starts its conv trunk from a saved model; the card records it; bad --init values are one error line."""

import json

import cv2
import numpy as np
import pytest
import torch

from exemplar_desc import ExemplarDescriptor
from exemplar_desc import train as train_module
from exemplar_desc.int8 import int8_available
from exemplar_desc.model_io import load_model
from exemplar_desc.networks import ExemplarClassifier, resolve_architecture
from exemplar_desc.training import init_model, loop
from exemplar_desc.training.init_model import model_settings

#: A run of 8 classes and 2 steps; --magnification skips the tuning.
TINY = ["--num-classes", "8", "--seeds-per-image", "8", "--samples-per-class", "4", "--batch-size", "16",
        "--pca-patches", "256", "--head-dim", "16", "--device", "cpu", "--threads", "1", "--magnification", "8"]


def _trunk(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.trunk.state_dict().items()}


def test_init_trunk_copies_the_model_and_leaves_the_classifier_fresh(random_model):
    torch.manual_seed(1)
    model = ExemplarClassifier(resolve_architecture("fast"), num_classes=8)
    fresh = _trunk(model)
    classifier = model.classifier.weight.detach().clone()
    record = init_model.init_trunk(model, str(random_model))
    source, card = load_model(random_model)
    expected = _trunk(source)
    assert _trunk(model).keys() == expected.keys()
    assert all(torch.equal(_trunk(model)[k], expected[k]) for k in expected)  # weights and batch-norm statistics
    assert not torch.equal(fresh["blocks.0.0.weight"], expected["blocks.0.0.weight"])  # so the copy did something
    assert torch.equal(model.classifier.weight, classifier)
    assert record == {"model": str(random_model), "sha256": card["sha256"], "conv_layers": "3 of 3"}


def test_run_starts_from_the_init_weights_and_records_them(random_model, folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [str(folder), *TINY, "--init", str(random_model), "--lr", "1e-30", "--weight-decay", "0",
            "--workdir", str(tmp_path / "work"), "--out-dir", str(out), "--name", "m"]
    assert train_module.main(args) == 0
    card = json.loads((out / "m.json").read_text())
    init_card = json.loads(random_model.read_text())
    assert card["architecture_name"] == "fast"  # taken from the init model, --arch not given
    assert card["training"]["init"] == {"model": str(random_model), "sha256": init_card["sha256"], "conv_layers": "3 of 3"}
    assert card["training"]["steps"] == 2
    assert card["min_patch_side"] == 0.0  # none asked
    assert card["head"]["pooling"] == "max"  # the default
    # Every written card carries its int8 calibration, from patches of the training photos.
    assert len(card["int8"]["activation_ranges"]) == 6 and card["int8"]["patches"] > 0  # input, 3 convolutions, projection in and out
    if int8_available():
        assert ExemplarDescriptor(out / "m.json", precision="int8").precision == "int8"
    trained, source = _trunk(load_model(out / "m.json")[0]), _trunk(load_model(random_model)[0])
    # With a vanishing learning rate the weights are the init model's (batch-norm running
    # statistics move with every forward pass in training mode, whatever the lr).
    weights = [k for k in source if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(trained[k], source[k]) for k in weights if k.endswith("0.weight"))  # conv weights
    assert all(torch.allclose(trained[k], source[k], atol=1e-20, rtol=0) for k in weights)

    # --resume of the finished run takes the trunk from the checkpoint, never again from --init.
    monkeypatch.setattr(loop, "init_trunk", lambda *a: pytest.fail("--resume re-initialised from --init"))
    assert train_module.main([*args, "--resume", "--head-dim", "8", "--min-patch-side", "20", "--head-pooling", "avg"]) == 0
    refitted = json.loads((out / "m.json").read_text())
    assert refitted["training"]["init"] == card["training"]["init"]
    assert refitted["min_patch_side"] == 20.0 and model_settings(refitted)["min_patch_side"] == 20.0  # a head setting
    assert refitted["head"]["pooling"] == "avg" and model_settings(refitted)["head_pooling"] == "avg"
    assert ExemplarDescriptor(out / "m.json", precision="fp32").min_patch_side == 20.0
    assert load_model(out / "m.json")[0].head.pooling == "avg"
    if int8_available():  # int8 pools by the mean too: nearer the float32 descriptors than those of max-pooling
        image = (np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)
        keypoints = [cv2.KeyPoint(float(x), float(y), 4, 30) for x in (30, 48, 66) for y in (30, 48, 66)]
        avg, int8, max_pooled = (ExemplarDescriptor(out / "m.json", precision=p) for p in ("fp32", "int8", "fp32"))
        max_pooled.net.head.pooling = "max"
        avg, int8, max_pooled = (d.compute(image, keypoints)[1] for d in (avg, int8, max_pooled))
        assert ((int8 - avg) ** 2).sum() < ((int8 - max_pooled) ** 2).sum()


def test_narrows_takes_fewer_filters_of_the_same_layout_only():
    fast = resolve_architecture("fast")
    assert init_model.narrows(resolve_architecture("fast-96"), fast) and init_model.narrows(resolve_architecture("fast-small"), fast)
    assert not init_model.narrows(fast, resolve_architecture("fast-96"))  # wider
    assert not init_model.narrows(resolve_architecture("fast-tiny"), fast)  # a stride changed
    assert not init_model.narrows(resolve_architecture("exemplar-small"), resolve_architecture("exemplar-nips"))  # no batch norm


def test_a_narrower_trunk_starts_from_the_init_channels_of_most_weight(random_model):
    source = load_model(random_model)[0].eval()
    model = ExemplarClassifier(resolve_architecture("fast-96"), num_classes=8)
    record = init_model.init_trunk(model, str(random_model))
    assert record["channels_kept"] == ["32 of 32", "64 of 64", "96 of 128"] and record["conv_layers"] == "3 of 3"
    kept = init_model.kept_channels(source, [32, 64, 96])
    assert [len(k) for k in kept] == [32, 64, 96] and torch.equal(kept[0], torch.arange(32))
    # The first two convolutions are whole, so the narrower trunk computes the init's kept maps (float64: no rounding
    # beyond 1e-12 of these unit-scale maps).
    patches = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        narrow, whole = model.trunk.double().eval()(patches), source.trunk.double()(patches)
    assert torch.allclose(narrow, whole[:, kept[2]], atol=1e-9, rtol=0)

    # Channels that nothing reads, or that their batch norm keeps below zero, go first.
    source = load_model(random_model)[0]
    with torch.no_grad():
        source.trunk.blocks[2][1].bias[:32] = -50.0  # dead after the ReLU
        source.trunk.blocks[2][0].weight[:, 5] = 0.0  # conv 2's channel 5, read by nothing
    kept = init_model.kept_channels(source, [32, 63, 96])
    assert torch.equal(kept[2], torch.arange(32, 128)) and torch.equal(kept[1], torch.tensor([c for c in range(64) if c != 5]))


def test_a_narrower_run_starts_from_the_init_head_rows_of_its_channels(random_model, folder, tmp_path):
    out = tmp_path / "out"
    args = [str(folder), *TINY, "--init", str(random_model), "--arch", "fast-96", "--loss", "distill", "--teacher",
            str(random_model), "--whitening", "learned", "--head-dim", "128", "--head-power", "1", "--lr", "1e-30",
            "--weight-decay", "0", "--workdir", str(tmp_path / "work"), "--out-dir", str(out), "--name", "m"]
    assert train_module.main(args) == 0
    card = json.loads((out / "m.json").read_text())
    assert card["architecture_name"] == "fast-96" and card["training"]["init"]["channels_kept"][2] == "96 of 128"
    source, trained = load_model(random_model)[0], load_model(out / "m.json")[0]
    rows = init_model.head_rows(init_model.kept_channels(source, [32, 64, 96])[2], 4)
    assert torch.allclose(trained.head.projection, source.head.projection[rows], atol=1e-20, rtol=0)


def test_a_run_without_init_records_none_and_resumes_a_checkpoint_older_than_the_light_families_and_seed_scales(folder, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(folder), *TINY, "--workdir", str(work), "--out-dir", str(out), "--name", "m"]
    assert train_module.main(args) == 0
    card = json.loads((out / "m.json").read_text())
    assert card["training"]["init"] is None and card["training"]["seed_scales"] == [1.0, 0.8, 0.64, 0.512]
    assert {k: card["training"]["transforms"][k] for k in ("gamma", "shading", "shadow", "noise")} == {
        "gamma": 1.0, "shading": 0.0, "shadow": 0.0, "noise": 0.0}
    # A checkpoint written before these families existed (and before --init) resumes with their defaults.
    checkpoint = torch.load(work / "checkpoint.pt", weights_only=True)
    for key in ("gamma", "shading", "shadow", "noise"):
        del checkpoint["config"]["transforms"][key]
    del checkpoint["config"]["init"], checkpoint["config"]["seed_scales"], checkpoint["init"]
    torch.save(checkpoint, work / "checkpoint.pt")
    assert train_module.main([*args, "--resume", "--head-dim", "8"]) == 0
    capsys.readouterr()
    assert train_module.main([*args, "--resume", "--shading", "0.7"]) == 2
    assert "--shading 0.0 -> 0.7" in capsys.readouterr().err


def test_light_family_and_seed_scale_options_reach_the_config(folder):
    args = train_module.build_parser().parse_args(
        [str(folder), "--gamma", "1.5", "--shading", "0.7", "--shadow", "0.3", "--noise", "0.02", "--without", "gamma", "--seed-scales", "1,0.5"])
    cfg = train_module.config_from_args(args)
    t = cfg.transforms
    assert (t.gamma, t.shading, t.shadow, t.noise) == (1.0, 0.7, 0.3, 0.02)
    assert cfg.seed_scales == (1.0, 0.5)


@pytest.mark.parametrize(
    "case, init, extra, option",
    [
        ("unknown-name", "no-such-model", [], "--init"),
        ("missing-file", "{tmp}/missing.pt", [], "--init"),
        ("corrupt-weights", "{tmp}/corrupt.json", [], "--init"),
        ("arch-mismatch", "{model}", ["--arch", "exemplar-nips"], "--arch"),
    ],
)
def test_bad_init_is_one_error_line_before_any_work(case, init, extra, option, random_model, folder, tmp_path, capsys):
    corrupt = json.loads(random_model.read_text())
    (tmp_path / "corrupt.pt").write_bytes(b"not weights")
    (tmp_path / "corrupt.json").write_text(json.dumps({**corrupt, "weights_file": "corrupt.pt"}))
    work, out = tmp_path / "work", tmp_path / "out"
    init = init.format(tmp=tmp_path, model=random_model)
    status = train_module.main([str(folder), *TINY, "--init", init, *extra, "--workdir", str(work), "--out-dir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} "), lines
    assert not work.exists() and not out.exists()
