"""python -m exemplar_desc.adapt: the photos' split, the class count, the decision rule, and the command end to end.

The command runs twice on 12 small photos with tiny training settings (a few steps, a
16-D head on a 2 x 2 grid): once from a base whose head is collapsed (every descriptor
the same up to sign), which any fitted head beats, so the adapted model is written; once
with a 1-D head asked for, which no 16-D base loses to, so the base is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import cv2
import numpy as np
import pytest
import torch

from benchmarks.comparison import format_comparison, is_better
from benchmarks.descriptors import build_descriptors
from benchmarks.validation import VALIDATION_KINDS
from exemplar_desc import ExemplarDescriptor
from exemplar_desc import adapt as adapt_module
from exemplar_desc.checks import OptionError
from exemplar_desc.images import gather_images
from exemplar_desc.model_io import DEFAULT_MODEL, load_model
from exemplar_desc.registry import check_descriptor_name
from exemplar_desc.training.config import TrainConfig
from exemplar_desc.training.holdout import MIN_HELD_OUT, collect_photos, held_out_count, photos_needed, split_photos
from exemplar_desc.training.init_model import load_init_model, model_settings
from exemplar_desc.training import seeds as seeds_module
from exemplar_desc.training.presets import ADAPT, PRESETS
from exemplar_desc.training.seeds import iter_rgb_images, sample_seeds, seed_pool

from .conftest import save_small_model, write_quarter_photos

#: A few training steps on few classes, a small PCA, one thread: seconds, not minutes.
TINY = ["--minutes", "0.05", "--samples-per-class", "4", "--epochs", "1", "--batch-size", "16", "--seeds-per-image", "8",
        "--pca-patches", "256", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_quarter_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A work folder both runs share (the held-out sequences are made once) and an output folder each."""
    root = tmp_path_factory.mktemp("adapt")
    return root / "work", root


def test_photos_are_named_from_their_common_folder_fingerprinted_and_split(tmp_path):
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    photos = collect_photos([tmp_path / "a", tmp_path / "b" / "3.png", tmp_path / "a" / "1.png"])  # 1.png twice
    assert photos.root == tmp_path and photos.names == ["a/1.png", "a/2.png", "b/3.png"]
    assert collect_photos([tmp_path / "a"]).names == ["1.png", "2.png"]
    before = photos.fingerprint()
    assert before == collect_photos([tmp_path]).fingerprint()  # the same photos, however they were named
    (tmp_path / "b" / "3.png").write_bytes(b"another size")
    assert photos.fingerprint() != before

    assert [held_out_count(n, 0.2) for n in (12, 29, 100)] == [6, 6, 20]  # at least 6; 20 % rounded half up
    assert photos_needed(0.2) == 12 and photos_needed(0.5) == 12 and MIN_HELD_OUT == len(VALIDATION_KINDS)
    names = [f"{i:03d}.jpg" for i in range(100)]
    training, held_out = split_photos(names, 0.2, seed=0)
    assert len(held_out) == 20 and sorted(training + held_out) == names and held_out == sorted(held_out)
    assert split_photos(names, 0.2, seed=0) == (training, held_out) and split_photos(names, 0.2, seed=1)[1] != held_out
    with pytest.raises(OptionError, match="needs at least 12 photos: 6 held out .* and 6 to train on"):
        split_photos(names[:11], 0.2, seed=0)


def test_the_seed_pool_gives_the_most_classes_a_run_can_have_and_its_seeds(photos):
    cfg = TrainConfig(images=(str(photos),), seeds_per_image=8, seed=3)
    pool = seed_pool(cfg)
    available = len(pool)
    assert 0 < available <= 8 * 12
    seeds = pool.choose(available - 5)
    assert seeds.shape == (available - 5, 3, 80, 80) and seeds.dtype == torch.uint8
    assert torch.equal(pool.choose(available - 5), seeds)  # a choice does not move the pool's generator
    images = iter_rgb_images(gather_images(cfg.images), cfg.max_side)
    assert torch.equal(sample_seeds(images, available - 5, np.random.default_rng(3), per_image=8), seeds)  # one draw, as sampled
    with pytest.raises(ValueError, match=f"found only {available} usable seed patches"):
        pool.choose(available + 1)


def test_the_adapt_preset_is_the_shipped_stage_from_the_default_with_its_head():
    fast = PRESETS["exemplar-fast-t005"].settings
    assert {k: v for k, v in ADAPT.settings.items() if fast.get(k) != v} == {
        "init": DEFAULT_MODEL, "time_budget_minutes": 15.0, "loss": "softmax+triplet", "whitening": "pairs", "whiten": 1.0,
        "pair_emphasis": 0.45, "pair_tune_steps": 600, "pair_temperature": 0.03, "pair_shading": 0.6, "head_pooling": "avg",
        "min_patch_side": 22.0}
    _, card = load_init_model(DEFAULT_MODEL)
    layers = len(card["architecture"]["spec"].split("-")) - 1  # the convolutions
    preset, from_card = ADAPT.config(), ADAPT.config(**model_settings(card))
    assert preset.head_layer % layers == from_card.head_layer % layers
    assert dataclasses.replace(from_card, head_layer=preset.head_layer) == preset  # the default's head is the preset's


@pytest.mark.parametrize("model, emphasis, steps", [
    ("exemplar-fast-t005-pairs-emph", 0.175, 0), ("exemplar-fast-t005-pairs-nce", 0.25, 600), ("exemplar-fast-t005-dtp60", 0.35, 600),
    (DEFAULT_MODEL, 0.45, 600),
    ("exemplar-fast-t005-pairs", 0.0, 0)])
def test_a_base_model_gives_its_pairs_emphasis_and_tuning_to_the_new_head(model, emphasis, steps):
    # A card without the keys (exemplar-fast-t005-pairs', older than the options) fits the plain pairs head.
    cfg = ADAPT.config(**model_settings(load_init_model(model)[1]))
    assert (cfg.pair_emphasis, cfg.pair_tune_steps) == (emphasis, steps)


TABLE = {"overall": {"mAP": 40.0, "MMA@3": 50.0, "H mean": 60.0, "sequences": 6, "pairs": 30},
         "per_kind": {"blur": {"mAP": 40.0, "MMA@3": 50.0, "H mean": 60.0, "sequences": 6, "pairs": 30}}}


@pytest.mark.parametrize("m_ap, mma, better", [
    (40.01, 50.01, True),   # both higher, however little
    (45.0, 50.0, False),    # one only equal
    (45.0, 49.99, False),   # one lower
    (None, 55.0, False),    # undefined is not better
])
def test_the_decision_is_higher_map_and_higher_mma(m_ap, mma, better):
    adapted = {"overall": {**TABLE["overall"], "mAP": m_ap, "MMA@3": mma}, "per_kind": TABLE["per_kind"]}
    assert is_better(TABLE, adapted) is better
    assert is_better(TABLE, TABLE) is False


def test_the_comparison_table_has_each_kind_overall_and_the_changes():
    adapted = {"overall": {**TABLE["overall"], "mAP": 41.5}, "per_kind": {"blur": {**TABLE["per_kind"]["blur"], "H mean": None}}}
    lines = format_comparison(TABLE, adapted).splitlines()
    assert lines[0].split()[:4] == ["seq", "mAP", "base", "mAP"] and lines[0].endswith("H mean change")
    assert lines[1].split()[:2] == ["blur", "6"] and lines[1].split()[-3:] == ["60.0", "-", "-"]
    assert lines[-1].split()[:5] == ["overall", "6", "40.0", "41.5", "+1.5"]


def test_too_few_photos_is_an_error_before_any_work(tmp_path, capsys):
    for i in range(11):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    argv = [str(tmp_path), "--name", "x", "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    assert adapt_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PHOTOS '11 photos': an adaptation needs at least 12 photos") and len(err.splitlines()) == 1
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def _count_seed_passes(monkeypatch: pytest.MonkeyPatch) -> list:
    """A list that grows by one at each pass over the photos for seed candidates."""
    passes: list = []
    candidates = seeds_module.seed_candidates

    def counted(*args, **kwargs):
        passes.append(args)
        return candidates(*args, **kwargs)

    monkeypatch.setattr(seeds_module, "seed_candidates", counted)
    return passes


def _status(argv: list[str]) -> int:
    """The command's exit status, whether it returns it or exits with it (a --base that does not load)."""
    try:
        return adapt_module.main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("options, message", [
    (["--base", "none"], "error: --base 'none': name the model to adapt"),
    (["--minutes", "none"], "error: --minutes 'none': an adaptation stops at its time budget"),
    (["--hold-out", "0.6"], "error: --hold-out 0.6: must be a finite number > 0 and <= 0.5"),
    (["--num-classes", "1000"], "error: --num-classes 1000: the 6 training photos give only"),  # counted before training
    (["--workdir", "{photos}/work"], "error: --workdir '{photos}/work': lies in the photo folder {photos}"),
    # The default base's head is tuned (600 steps), a tuning a learned head cannot take: the error says how to drop it.
    (["--whitening", "learned"], "error: --pair-tune-steps 600: tuning is for the pairs whitening, not learned: give "
                                 "whitening pairs, or 0 tuning steps"),
])
def test_bad_options_are_one_error_line_and_nothing_written(photos, tmp_path, capsys, options, message):
    options = [option.format(photos=photos) for option in options]
    argv = [str(photos), "--name", "x", *TINY, "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), *options]
    assert _status(argv) == 2
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the seed count's progress bar, which clears itself
    assert err.startswith(message.format(photos=photos)) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists() and not (photos / "work").exists()


@pytest.fixture(scope="module")
def better(photos, run_dirs):
    """(the base's card path, what the command printed) of the run from the collapsed base, into ``ROOT/better``."""
    work, root = run_dirs
    base = save_small_model(root / "bases", "collapsed", collapsed=True)
    argv = [str(photos), "--name", "mine", "--base", str(base), *TINY, "--workdir", str(work), "--out-dir", str(root / "better")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert adapt_module.main(argv) == 0
    return base, printed.getvalue()


def test_an_adapted_model_that_is_better_is_written_with_its_card(photos, run_dirs, better):
    root = run_dirs[1]
    base, out = better
    assert "better on the held-out photos" in out and "overall" in out and "surrogate classes: " in out
    card = json.loads((root / "better" / "mine.json").read_text())
    report = json.loads((root / "better" / "mine.adapt.json").read_text())
    record = card["adaptation"]
    assert report == {"adaptation": record, "model": str(root / "better" / "mine.json")}
    assert record["base"]["model"] == str(base) and record["base"]["sha256"] == load_init_model(str(base))[1]["sha256"]
    assert record["photos"]["count"] == 12 and record["photos"]["sha256"] == collect_photos([photos]).fingerprint()
    assert record["held_out"]["count"] == 6 and sorted(record["held_out"]["kinds"].values()) == sorted(VALIDATION_KINDS)
    assert record["training_photos"] == 6 and record["minutes"] == 0.05 and record["loss"] == "softmax+triplet"
    assert record["num_classes"]["used"] == card["training"]["num_classes"] == record["num_classes"]["seed_patches"] < 2000
    assert record["decision"]["better"] and set(record["results"]) == {"base", "adapted"}
    assert record["results"]["adapted"]["overall"]["mAP"] > record["results"]["base"]["overall"]["mAP"]
    training = card["training"]
    assert training["preset"] == "adapt" and training["command"].startswith("python -m exemplar_desc.adapt ")
    assert not set(training["data"]["image_folders"]) & {str(photos / name) for name in record["held_out"]["photos"]}
    assert (card["head"]["grid"], card["head"]["dim"], card["magnification"]) == (2, 16, 8.0)  # the base's descriptor


def test_the_adapted_card_works_wherever_a_model_goes(run_dirs, photos, better):
    card = run_dirs[1] / "better" / "mine.json"
    image = cv2.imread(str(photos / "astronaut-0.png"))
    keypoints = cv2.SIFT_create(nfeatures=50).detect(image, None)
    _, desc = ExemplarDescriptor(str(card)).compute(image, keypoints)
    assert desc.shape == (len(keypoints), 16)
    built, skipped = build_descriptors([f"exemplar:{card}"])
    assert not skipped and built[f"exemplar:{card}"].descriptorSize() == 16
    check_descriptor_name("descriptor", f"exemplar:{card}")  # the SfM and extract commands' check
    assert load_model(card)[1]["adaptation"]["decision"]["better"]


def test_an_adapted_model_that_is_not_better_is_not_written(photos, run_dirs, capsys, monkeypatch):
    work, root = run_dirs
    base = save_small_model(root / "bases", "fitted")
    out_dir = root / "worse"
    argv = [str(photos), "--name", "mine", "--base", str(base), "--head-dim", "1", *TINY, "--workdir", str(work),
            "--out-dir", str(out_dir)]
    passes = _count_seed_passes(monkeypatch)
    assert adapt_module.main(argv) == 0
    assert len(passes) == 1  # the training takes its seeds from the pass that counted them
    out = capsys.readouterr().out
    assert "not better on the held-out photos" in out and f"kept the base model {base}; no model written" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["mine.adapt.json"]  # the report only
    report = json.loads((out_dir / "mine.adapt.json").read_text())
    assert report["model"] is None and report["adaptation"]["decision"]["better"] is False


def test_head_only_fits_a_new_head_on_the_bases_trunk(photos, run_dirs, capsys):
    work, root = run_dirs
    base = save_small_model(root / "bases", "collapsed", collapsed=True)
    out_dir = root / "head-only"
    argv = [str(photos), "--name", "mine", "--base", str(base), "--head-only", *TINY, "--workdir", str(work), "--out-dir", str(out_dir)]
    assert adapt_module.main(argv) == 0
    assert "by a new head on its trunk (--head-only)" in capsys.readouterr().out
    record = json.loads((out_dir / "mine.adapt.json").read_text())["adaptation"]
    assert record["head_only"] and record["minutes"] == 0
    assert record["decision"]["better"]  # any fitted head beats the collapsed one
    adapted, card = load_model(out_dir / "mine.json")
    assert card["training"]["refit_head"] and card["training"]["steps"] == 0
    trunk = load_model(base)[0].trunk.state_dict()
    assert all(torch.equal(value, trunk[key]) for key, value in adapted.trunk.state_dict().items())  # no training step
