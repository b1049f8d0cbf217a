"""--preset: the shipped model's recipe by name; explicit options win; the card records it; --help tells every default."""

import dataclasses
import json
import shlex

import pytest

from exemplar_desc import train as train_module
from exemplar_desc.model_io import resolve_card_path
from exemplar_desc.training.config import TrainConfig
from exemplar_desc.training.presets import PRESETS
from exemplar_desc.training.transforms import FAMILY_RECORDS, TransformConfig

#: Options of the card's command that belong to the machine or the output, not the recipe.
NOT_RECIPE = {"--threads": 1, "--workdir": 1, "--out-dir": 1, "--name": 1, "--resume": 0}


def _config(argv):
    """The checked TrainConfig (data paths aside) and the arguments of a command line."""
    _, args = train_module.parse_args(argv)
    return train_module.config_from_args(args, data=False), args


def _recipe_arguments(command: str) -> list[str]:
    """The card's command line without the program and the machine's and output's options."""
    words, kept = shlex.split(command)[3:], []
    while words:
        word = words.pop(0)
        if word in NOT_RECIPE:
            del words[: NOT_RECIPE[word]]
        else:
            kept.append(word)
    return kept


@pytest.mark.parametrize("preset, model", [("exemplar-fast-t005", "exemplar-fast-t005"), ("distill", "exemplar-fast-tiny-shaded")])
def test_a_shipped_preset_is_the_shipped_cards_recipe(preset, model):
    card = json.loads(resolve_card_path(model).read_text())
    training = card["training"]
    folders = training["data"]["image_folders"]
    from_card, _ = _config(_recipe_arguments(training["command"]))
    from_preset, args = _config([*folders, "--preset", preset])
    assert from_preset == from_card
    assert args.preset == preset
    # And field by field against the card's record of the run.
    assert from_preset.init == (training["init"] or {}).get("model")
    assert from_preset.teacher == training.get("loss", {}).get("teacher", {}).get("model")  # cards before the losses have none
    assert from_preset.arch == card["architecture_name"]
    assert dataclasses.asdict(from_preset.transforms) == {k: tuple(v) if isinstance(v, list) else v for k, v in training["transforms"].items()}
    assert (from_preset.num_classes, from_preset.samples_per_class, from_preset.epochs) == (
        training["num_classes"], training["samples_per_class_per_epoch"], training["epochs"])
    assert (from_preset.time_budget_minutes, from_preset.batch_size, from_preset.seed) == (
        training["time_budget_minutes"], training["batch_size"], training["seed"])
    assert list(from_preset.seed_scales) == training["seed_scales"]
    optimizer = training["optimizer"]
    assert (from_preset.lr, from_preset.momentum, from_preset.weight_decay) == (optimizer["lr"], optimizer["momentum"], optimizer["weight_decay"])
    head = card["head"]
    assert (from_preset.head_grid, from_preset.head_dim, from_preset.head_power, from_preset.whiten, from_preset.pca_patches) == (
        head["grid"], head["dim"], head["power"], head["whiten"], head["pca_patches"])
    assert from_preset.magnification == card["magnification"]


def test_the_pruned_student_is_the_distill_preset_from_the_default_channels():
    card = json.loads(resolve_card_path("exemplar-fast-64-shaded").read_text())
    training = card["training"]
    cfg, args = _config(_recipe_arguments(training["command"]))
    preset, _ = _config([*training["data"]["image_folders"], "--preset", "distill"])
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(preset, f.name)}
    assert args.preset == "distill" and changed == {"arch", "init", "head_pooling", "lr"}
    default = "exemplar-fast-t005-shaded"  # init and teacher alike: the student starts from the channels of its teacher
    assert (cfg.arch, cfg.init, cfg.teacher, cfg.head_pooling, cfg.lr) == ("fast-64", default, default, "avg", 0.05)
    assert card["architecture_name"] == "fast-64" and card["head"]["pooling"] == "avg"
    assert training["init"]["model"] == cfg.init and training["init"]["channels_kept"] == ["32 of 32", "64 of 64", "64 of 128"]


def test_explicit_options_override_the_preset(tmp_path):
    cfg, _ = _config([str(tmp_path), "--translation", "0.1", "--preset", "exemplar-fast-t005", "--lr", "0.02", "--without", "blur"])
    assert cfg.transforms.translation == 0.1 and cfg.lr == 0.02 and cfg.transforms.blur == 0.0
    assert cfg.num_classes == 2000 and cfg.whiten == 0.5 and cfg.init == "exemplar-fast-t01"  # the preset's others
    cfg, _ = _config([str(tmp_path), "--preset", "exemplar-fast-t005", "--init", "none", "--time-budget", "none"])
    assert cfg.init is None and cfg.time_budget_minutes is None and cfg.arch == "fast"  # none unsets a preset's value


def test_paper_preset_is_the_defaults(tmp_path):
    assert PRESETS["paper"].config() == TrainConfig()
    cfg, args = _config([str(tmp_path)])
    assert cfg == TrainConfig(images=(str(tmp_path),)) and args.preset is None
    assert args.out_dir == "models"  # not the shipped weights folder


def test_a_preset_takes_only_settings():
    with pytest.raises(ValueError, match="not a training setting: out_dir"):
        dataclasses.replace(PRESETS["paper"], settings={"out_dir": "x"}).config()
    for preset in PRESETS.values():
        preset.config()  # every name in the table is a field or a family


def test_help_tells_every_default_and_the_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    for argv in (["--help"], ["--preset", "exemplar-fast-t005", "--help"]):
        with pytest.raises(SystemExit) as info:
            train_module.parse_args(argv)
        assert info.value.code == 0
    paper, preset = capsys.readouterr().out.split("usage:")[1:]
    assert "TransformConfig" not in paper and "(default: None)" not in paper
    assert "(default: fast, or the --init model's)" in paper and "(default: models)" in paper
    assert "--translation T" in paper and "(default: 0.2; identity: 0.0)" in paper
    assert "(default: 0.05; identity: 0.0)" in preset and "(default: exemplar-fast-t01)" in preset
    parser = train_module.build_parser()
    for action in parser._actions:
        if action.dest not in ("help", "resume"):
            assert "(default: " in action.help, action.dest
    assert {f.name for f in FAMILY_RECORDS} <= {a.dest for a in parser._actions}


def test_transform_config_is_generated_from_the_records():
    config = TransformConfig()
    assert [f.name for f in dataclasses.fields(config)] == [family.name for family in FAMILY_RECORDS]
    assert all(getattr(config, family.name) == family.default for family in FAMILY_RECORDS)
    off = config.without(*(family.name for family in FAMILY_RECORDS))
    assert all(getattr(off, family.name) == family.identity for family in FAMILY_RECORDS)


def test_the_card_records_the_preset(folder, tmp_path):
    tiny = ["--num-classes", "8", "--seeds-per-image", "8", "--samples-per-class", "4", "--batch-size", "16",
            "--pca-patches", "256", "--head-dim", "16", "--device", "cpu", "--threads", "1", "--magnification", "8"]
    args = [str(folder), "--preset", "paper", *tiny, "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--name", "m"]
    assert train_module.main(args) == 0
    assert json.loads((tmp_path / "out" / "m.json").read_text())["training"]["preset"] == "paper"
