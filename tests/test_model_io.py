import json

import pytest
import torch

from exemplar_desc.model_io import DEFAULT_MODEL, list_models, load_model, resolve_card_path, save_model, weights_dir


def test_round_trip_keeps_every_tensor(random_model, tmp_path):
    net, card = load_model(random_model)
    assert card["name"] == "random-fast" and card["weights_file"] == "random-fast.pt"
    path = save_model(net, {k: card[k] for k in ("architecture", "patch_size", "magnification", "head")}, tmp_path, "copy")
    copy, copy_card = load_model(path)
    for (name, a), (_, b) in zip(net.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(net(x), copy(x))
    assert load_model(path.with_suffix(".pt"))[1]["name"] == "copy"  # the weights path finds its card


def _copy_model(src, dst):
    for suffix in (".json", ".pt"):
        (dst / f"m{suffix}").write_bytes(src.with_suffix(suffix).read_bytes())
    card = json.loads((dst / "m.json").read_text())
    (dst / "m.json").write_text(json.dumps({**card, "weights_file": "m.pt"}))
    return dst / "m.json"


def test_corrupted_weights_are_refused(random_model, tmp_path):
    card = _copy_model(random_model, tmp_path)
    weights = tmp_path / "m.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m\.pt is corrupted or truncated"):
        load_model(card)


def test_truncated_weights_are_refused(random_model, tmp_path):
    card = _copy_model(random_model, tmp_path)
    weights = tmp_path / "m.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_model(card)


def test_missing_and_malformed(random_model, tmp_path):
    card = _copy_model(random_model, tmp_path)
    (tmp_path / "m.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(card)
    card.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        load_model(card)
    with pytest.raises(FileNotFoundError, match="shipped models"):
        resolve_card_path("no-such-model")


def test_weights_load_without_executing_code(random_model):
    # weights_only loading accepts the file: it holds tensors only.
    state = torch.load(random_model.with_suffix(".pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_default_model_is_shipped_with_a_complete_card():
    assert DEFAULT_MODEL in list_models(), f"no {DEFAULT_MODEL} model in {weights_dir()}"
    net, card = load_model()
    for key in ("architecture", "patch_size", "magnification", "head", "flops_per_patch", "training", "sha256"):
        assert key in card, key
    for key in ("command", "num_classes", "samples_seen", "steps", "device", "wall_time_s", "data"):
        assert key in card["training"], key
    assert card["training"]["command"].startswith("python -m exemplar_desc.train")
    assert card["head"]["dim"] == 128


def test_card_without_sha256_is_refused_as_unverifiable(random_model, tmp_path):
    card_path = _copy_model(random_model, tmp_path)
    card = json.loads(card_path.read_text())
    del card["sha256"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"lacks the sha256 of its weights, so m\.pt cannot be verified") as info:
        load_model(card_path)
    assert "corrupted" not in str(info.value)


def test_identical_weights_give_identical_files(random_model, tmp_path):
    # torch.save on a path names the archive after the file; save_model must not depend on it.
    net, card = load_model(random_model)
    keep = {k: card[k] for k in ("architecture", "patch_size", "magnification", "head")}
    a, b = save_model(net, keep, tmp_path / "a", "one"), save_model(net, keep, tmp_path / "b", "two")
    assert a.with_suffix(".pt").read_bytes() == b.with_suffix(".pt").read_bytes()
    assert json.loads(a.read_text())["sha256"] == json.loads(b.read_text())["sha256"]
