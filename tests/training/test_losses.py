"""The losses on descriptors: HardNet's hardest-in-batch triplet margin over two views of each seed, and distillation (pointwise and relational)."""

import json
import math
from dataclasses import replace

import cv2
import pytest
import torch

from exemplar_desc import ExemplarDescriptor
from exemplar_desc import train as train_module
from exemplar_desc.checks import OptionError
from exemplar_desc.networks import ExemplarClassifier, resolve_architecture
from exemplar_desc.patches import normalize_patches
from exemplar_desc.training import loop as loop_module
from exemplar_desc.training import pairs as pairs_module
from exemplar_desc.training.checkpoint import config_record
from exemplar_desc.training.config import TrainConfig
from exemplar_desc.training.init_model import load_init_model
from exemplar_desc.training.losses import (attach_matching_head, distillation_loss, hardest_triplet_loss, info_nce_loss, paired_class_ids,
                                          relational_distillation_loss)

#: A run of 8 classes and a few steps, a 16-D head; --magnification skips the tuning.
TINY = ["--num-classes", "8", "--seeds-per-image", "8", "--samples-per-class", "4", "--batch-size", "16",
        "--pca-patches", "256", "--head-dim", "16", "--device", "cpu", "--threads", "1", "--magnification", "8"]


def test_the_triplet_loss_is_hardnets_on_hand_made_pairs():
    e = torch.eye(3)
    # Matching pairs: positives at distance sqrt(1e-8), every negative at sqrt(2 + 1e-8).
    assert hardest_triplet_loss(e, e, margin=1.0).item() == 0.0
    expected = 2.0 + math.sqrt(1e-8) - math.sqrt(2 + 1e-8)
    assert hardest_triplet_loss(e, e, margin=2.0).item() == pytest.approx(expected, abs=1e-6)  # float32 rounding of ~2
    # Swapped positives: each positive at sqrt(2), and a negative (the other's view) at distance ~0.
    a, p = e[:2], e[[1, 0]]
    assert hardest_triplet_loss(a, p, margin=1.0).item() == pytest.approx(1.0 + math.sqrt(2 + 1e-8) - math.sqrt(1e-8), abs=1e-6)


def test_the_hardest_negative_is_taken_over_rows_and_columns():
    # Pair 0's anchor is far from every other positive, but pair 1's anchor sits next to
    # positive 0: the column minimum must find it.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.nn.functional.normalize(torch.tensor([[1.0, 0.9], [-1.0, 0.2]]), dim=1)
    d = torch.cdist(a, p)
    hardest = [min(d[0, 1], d[1, 0]), min(d[1, 0], d[0, 1])]
    expected = sum(max(0.0, 1 + float(d[i, i]) - float(hardest[i])) for i in range(2)) / 2
    assert hardest_triplet_loss(a, p).item() == pytest.approx(expected, abs=1e-5)


def test_the_triplet_loss_checks_its_input():
    with pytest.raises(ValueError, match="N >= 2"):
        hardest_triplet_loss(torch.ones(1, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
        hardest_triplet_loss(torch.ones(3, 4), torch.ones(3, 5))


def test_info_nce_is_log_n_when_nothing_is_told_apart_and_vanishes_when_all_is():
    n = 6
    same = torch.nn.functional.normalize(torch.ones(n, 4), dim=1)
    # Equal logits: the cross-entropy of a uniform softmax, log(n), up to float32 rounding of the logits (1e-6).
    assert math.isclose(float(info_nce_loss(same, same, 0.1)), math.log(n), rel_tol=1e-5)
    basis = torch.eye(n)
    # Logits 1 / 0.01 = 100 on the diagonal, 0 elsewhere: log(1 + (n - 1) e^-100), below 1e-40.
    assert float(info_nce_loss(basis, basis, 0.01)) < 1e-6
    a, p = (torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(k)), dim=1) for k in (0, 1))
    assert torch.isclose(info_nce_loss(a, p, 0.2), info_nce_loss(p, a, 0.2), rtol=1e-6)  # both directions, symmetric


def test_info_nce_checks_its_input():
    with pytest.raises(ValueError, match="N >= 2"):
        info_nce_loss(torch.ones(1, 4), torch.ones(1, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(torch.eye(3), torch.eye(3), 0.0)


def test_paired_ids_hold_two_views_of_distinct_seeds():
    ids = paired_class_ids(50, 32, torch.Generator().manual_seed(0))
    first, second = ids.chunk(2)
    assert ids.dtype == torch.int64 and torch.equal(first, second)
    assert len(set(first.tolist())) == 16 and int(ids.max()) < 50
    assert torch.equal(ids, paired_class_ids(50, 32, torch.Generator().manual_seed(0)))


def test_the_distillation_loss_is_the_mean_squared_distance():
    e = torch.eye(4)
    assert distillation_loss(e, e).item() == 0.0
    assert distillation_loss(e, -e).item() == 4.0  # opposite unit vectors
    assert distillation_loss(e, e[[1, 2, 3, 0]]).item() == 2.0  # orthogonal ones
    with pytest.raises(ValueError, match=r"\(4, 4\) and \(4, 3\)"):
        distillation_loss(e, e[:, :3])


def test_the_relational_loss_is_the_kl_divergence_of_the_views_rankings():
    e = torch.eye(4)
    views = torch.cat([e, e])  # two views of 4 seeds, each view its seed's axis
    assert relational_distillation_loss(views, views, 0.1).item() == 0.0
    # A student whose views are all alike has uniform softmaxes: KL = log 4 - the teacher's entropy, in both directions.
    flat = torch.nn.functional.normalize(torch.ones(8, 4), dim=1)
    p = math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 3)  # the teacher's weight on the matching view at temperature 0.5
    entropy = -p * math.log(p) - (1 - p) * math.log((1 - p) / 3)
    assert relational_distillation_loss(flat, views, 0.5).item() == pytest.approx(math.log(4) - entropy, rel=1e-5)  # float32 exp/log
    with pytest.raises(ValueError, match=r"N even and >= 4, got \(7, 4\)"):
        relational_distillation_loss(views[:7], views[:7], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        relational_distillation_loss(views, views, 0.0)


def _one_pair_pool(images, count, views, magnification, patch_size, seed, noise, jpeg, min_side, shading):
    """A stand-in for :func:`pairs.warped_pairs`: one pair of two distinct random patches, 20 times."""
    patches = normalize_patches(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    yield patches[:1].expand(20, -1, -1, -1), patches[1:].expand(20, -1, -1, -1)


@pytest.mark.parametrize("photos", [False, True])
def test_the_relational_term_takes_pairs_of_views(folder, tmp_path, monkeypatch, photos):
    """distill_relation ranks two surrogate views of each of B/2 seeds; with distill_photos, the B/2
    photo pairs after the batch, which the teacher then describes too.

    The photo pool holds one pair repeated, so the rows of a pair's side are all alike; two
    surrogate views of distinct seeds would not be.
    """
    calls = []

    def relation(s, t, temperature):
        calls.append(("relation", tuple(s.shape), temperature, bool(torch.allclose(t[:8], t[:1].expand(8, -1), atol=1e-5))))
        return real_relation(s, t, temperature)

    real_ids, real_mse, real_relation = loop_module.paired_class_ids, loop_module.distillation_loss, loop_module.relational_distillation_loss
    monkeypatch.setattr(pairs_module, "warped_pairs", _one_pair_pool)
    monkeypatch.setattr(loop_module, "paired_class_ids", lambda *args: calls.append("ids") or real_ids(*args))
    monkeypatch.setattr(loop_module, "distillation_loss", lambda s, t: calls.append(("mse", len(s), len(t))) or real_mse(s, t))
    monkeypatch.setattr(loop_module, "relational_distillation_loss", relation)
    argv = [str(folder), *TINY, "--head-dim", "128", "--loss", "distill", "--teacher", "exemplar-fast-t005-pairs", "--whitening",
            "learned", "--distill-relation", "0.5", "--distill-temperature", "0.2", "--pair-photos", "2", "--pair-views", "1",
            *(["--distill-photos"] if photos else []), "--workdir", str(tmp_path / "w"), "--out-dir", str(tmp_path / "o"), "--name", "r"]
    assert train_module.main(argv) == 0
    rows = 32 if photos else 16  # 16 surrogate samples, then 8 photo pairs
    first_step = [*([] if photos else ["ids"]), ("mse", rows, rows), ("relation", (16, 128), 0.2, photos)]
    assert calls[: len(first_step)] == first_step
    loss = json.loads((tmp_path / "o" / "r.json").read_text())["training"]["loss"]
    assert loss["distill_relation"] == 0.5 and loss["distill_temperature"] == 0.2
    assert loss.get("distill_photos", False) == photos


@pytest.mark.parametrize("cross", [False, True])
def test_cross_distillation_teaches_each_view_the_photo_patchs_descriptor(folder, tmp_path, monkeypatch, cross):
    """With distill_cross the teacher's target for a photo pair's view is its descriptor of the
    pair's photo patch; without, of the view's own patch (the two patches differ here)."""
    targets = []
    real_mse = loop_module.distillation_loss
    monkeypatch.setattr(pairs_module, "warped_pairs", _one_pair_pool)
    monkeypatch.setattr(loop_module, "distillation_loss", lambda s, t: targets.append(t) or real_mse(s, t))
    argv = [str(folder), *TINY, "--head-dim", "128", "--loss", "distill", "--teacher", "exemplar-fast-t005-pairs", "--whitening",
            "learned", "--pair-photos", "2", "--pair-views", "1", "--distill-photos", *(["--distill-cross"] if cross else []),
            "--workdir", str(tmp_path / "w"), "--out-dir", str(tmp_path / "o"), "--name", "r"]
    assert train_module.main(argv) == 0
    target = targets[0]  # 16 surrogate samples, 8 photo patches, their 8 views
    assert target.shape == (32, 128)
    assert torch.equal(target[24:], target[16:24]) == cross
    loss = json.loads((tmp_path / "o" / "r.json").read_text())["training"]["loss"]
    assert loss.get("distill_cross", False) == cross


@pytest.mark.parametrize(
    "settings, field",
    [({"loss": "hinge"}, "loss"), ({"loss": "triplet", "batch_size": 15}, "batch_size"),
     ({"loss": "softmax+triplet", "num_classes": 7, "batch_size": 16}, "num_classes"), ({"margin": 3.0}, "margin"),
     ({"loss": "distill"}, "teacher"), ({"loss": "distill+triplet"}, "teacher"), ({"teacher": "exemplar-fast-t005-pairs"}, "teacher"),
     ({"loss": "softmax+triplet", "teacher": "exemplar-fast-t005-pairs"}, "teacher"),
     ({"loss": "distill+triplet", "teacher": "exemplar-fast-t005-pairs", "batch_size": 15}, "batch_size"),
     ({"loss": "distill", "teacher": "no-such-model"}, "teacher"),
     ({"loss": "softmax", "distill_relation": 1.0}, "distill_relation"), ({"distill_temperature": 0.0}, "distill_temperature"),
     ({"loss": "softmax+triplet", "distill_photos": True, "magnification": 10.0}, "distill_photos"),
     ({"loss": "distill", "teacher": "exemplar-fast-t005-pairs", "distill_photos": True}, "distill_photos"),
     ({"loss": "distill", "teacher": "exemplar-fast-t005-pairs", "distill_cross": True, "magnification": 10.0}, "distill_cross"),
     ({"loss": "distill", "teacher": "exemplar-fast-t005-pairs", "distill_relation": 1.0, "batch_size": 15}, "batch_size"),
     ({"loss": "distill", "teacher": "exemplar-fast-t005-pairs", "head_dim": 64}, "teacher"),
     ({"whitening": "learned"}, "whitening"), ({"triplet_pairs": "views"}, "triplet_pairs"),
     ({"loss": "softmax", "triplet_pairs": "photos", "magnification": 10.0}, "triplet_pairs"),
     ({"loss": "softmax+triplet", "triplet_pairs": "photos"}, "triplet_pairs")],
)
def test_bad_loss_settings_are_named(folder, settings, field):
    with pytest.raises(OptionError) as err:
        TrainConfig(images=(str(folder),), **settings).check()
    assert err.value.option == field


def test_the_matching_head_starts_from_the_init_models_head():
    cfg = TrainConfig(images=("x",), init="exemplar-fast-t005", loss="softmax+triplet", head_layer=2, head_power=0.5)
    model = ExemplarClassifier(resolve_architecture("fast"), num_classes=8)
    attach_matching_head(model, cfg)
    net, _ = load_init_model("exemplar-fast-t005")
    assert torch.equal(model.matching.projection.detach(), net.head.projection)
    assert isinstance(model.matching.projection, torch.nn.Parameter) and not model.matching.probe_only
    # The training form gives the shipped head's descriptors (its features are >= 0, so the clamp does nothing).
    features = torch.rand(5, 128, 8, 8)
    assert torch.allclose(model.matching(features), net.head(features), atol=1e-5)  # float32 sums of 2048 terms


def test_triplet_alone_trains_the_classifier_as_a_probe_only():
    cfg = TrainConfig(images=("x",), loss="triplet", head_dim=16)
    model = ExemplarClassifier(resolve_architecture("fast"), num_classes=8)
    attach_matching_head(model, cfg)
    logits, descriptors = model(torch.rand(4, 1, 32, 32))
    assert descriptors.shape == (4, 16) and torch.allclose(descriptors.norm(dim=1), torch.ones(4), atol=1e-5)
    logits.sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())  # the softmax term stops before the trunk
    assert model.classifier.weight.grad is not None


def test_a_matching_run_records_its_loss_in_the_card(folder, tmp_path, capsys):
    argv = [str(folder), *TINY, "--loss", "softmax+triplet", "--margin", "0.5", "--workdir", str(tmp_path / "w"),
            "--out-dir", str(tmp_path / "o"), "--name", "m"]
    assert train_module.main(argv) == 0
    card = json.loads((tmp_path / "o" / "m.json").read_text())
    assert card["training"]["loss"] == {"type": "softmax+triplet", "margin": 0.5, "triplet_weight": 1.0, "triplet_pairs": "surrogate"}
    log = json.loads((tmp_path / "w" / "log.json").read_text())
    assert math.isfinite(log[-1]["train_loss"])


def test_distill_plus_triplet_records_both_terms(folder, tmp_path):
    """The model as its own teacher and init: the card names the teacher and the triplet's settings."""
    argv = [str(folder), *TINY, "--head-dim", "128", "--loss", "distill+triplet", "--teacher", "exemplar-fast-t005-pairs",
            "--init", "exemplar-fast-t005-pairs", "--whitening", "learned", "--workdir", str(tmp_path / "w"),
            "--out-dir", str(tmp_path / "o"), "--name", "dt"]
    assert train_module.main(argv) == 0
    loss = json.loads((tmp_path / "o" / "dt.json").read_text())["training"]["loss"]
    sha = load_init_model("exemplar-fast-t005-pairs")[1]["sha256"]
    assert loss == {"type": "distill+triplet", "margin": 1.0, "triplet_weight": 1.0, "triplet_pairs": "surrogate",
                    "teacher": {"model": "exemplar-fast-t005-pairs", "sha256": sha}}


def test_photo_pairs_feed_the_triplet_term(folder, tmp_path, monkeypatch):
    """With triplet_pairs photos each step takes batch_size / 2 pairs from the photo-pair pool, beside the batch.

    The pool here holds one pair repeated, so the triplet term's rows are all alike; two
    surrogate views of distinct seeds would not be.
    """
    import exemplar_desc.training.loop as loop

    made, taken = [], []

    def pool(images, photos, views, magnification, patch_size, seed, noise, jpeg, min_side, shading):
        made.append((photos, views, magnification, seed))
        yield from _one_pair_pool(images, photos, views, magnification, patch_size, seed, noise, jpeg, min_side, shading)

    def triplet(a, p, margin):
        taken.append((len(a), bool(torch.allclose(a, a[:1].expand_as(a), atol=1e-5))))
        return real(a, p, margin)

    real = loop_module.hardest_triplet_loss
    monkeypatch.setattr(pairs_module, "warped_pairs", pool)
    monkeypatch.setattr(loop_module, "hardest_triplet_loss", triplet)
    argv = [str(folder), *TINY, "--loss", "softmax+triplet", "--triplet-pairs", "photos", "--pair-photos", "2",
            "--pair-views", "1", "--seed", "5", "--workdir", str(tmp_path / "w"), "--out-dir", str(tmp_path / "o"), "--name", "pp"]
    assert train_module.main(argv) == 0
    assert made == [(2, 1, 8.0, 8)]  # the pairs whitening's settings, drawn with seed + 3
    assert taken == [(8, True)] * 2  # 8 classes x 4 samples in steps of 16: two steps of 8 pairs
    loss = json.loads((tmp_path / "o" / "pp.json").read_text())["training"]["loss"]
    assert loss["triplet_pairs"] == "photos"


def _distance_to_teacher(model: str, folder) -> float:
    """Mean squared distance between ``model``'s descriptors and exemplar-fast-t005-pairs' at 300 SIFT keypoints of the folder's photos."""
    image = cv2.imread(str(sorted(folder.iterdir())[0]))
    kps = cv2.SIFT_create(nfeatures=300).detect(image, None)
    _, student = ExemplarDescriptor(model, precision="fp32").compute(image, kps)
    _, teacher = ExemplarDescriptor("exemplar-fast-t005-pairs", precision="fp32").compute(image, kps)
    return float(((student - teacher) ** 2).sum(1).mean())


def test_a_distilled_student_moves_towards_its_teacher(folder, tmp_path):
    """A small network trained with the loss distill and its learned head gives descriptors nearer the teacher's."""
    student = ["--arch", "fast-small", "--loss", "distill", "--teacher", "exemplar-fast-t005-pairs", "--whitening", "learned",
               "--head-layer", "2", "--num-classes", "8", "--seeds-per-image", "8", "--batch-size", "64", "--lr", "0.25",
               "--device", "cpu", "--threads", "1", "--magnification", "10", "--out-dir", str(tmp_path / "o")]
    distances = {}
    for samples in (1, 300):  # 1 sample per class: one step, the student about as initialised
        name = f"s{samples}"
        argv = [str(folder), *student, "--samples-per-class", str(samples), "--workdir", str(tmp_path / name), "--name", name]
        assert train_module.main(argv) == 0
        distances[samples] = _distance_to_teacher(str(tmp_path / "o" / f"{name}.json"), folder)
    card = json.loads((tmp_path / "o" / "s300.json").read_text())
    assert card["training"]["loss"]["teacher"]["model"] == "exemplar-fast-t005-pairs"
    assert card["training"]["loss"]["teacher"]["sha256"] == load_init_model("exemplar-fast-t005-pairs")[1]["sha256"]
    assert card["head"]["whitening"] == "learned" and card["head"]["explained_variance"] is None
    # Unit descriptors: 2 is the distance of unrelated ones; training must close a good part of it.
    assert distances[300] < 0.75 * distances[1], distances


def test_a_head_refit_cannot_keep_a_learned_head(folder, tmp_path):
    cfg = TrainConfig(images=(str(folder),), init="exemplar-fast-t005", loss="triplet", whitening="learned", head_layer=2)
    with pytest.raises(OptionError) as err:
        train_module.train(cfg, tmp_path, refit_head=True)
    assert err.value.option == "refit_head"


def test_a_resumed_photo_pair_run_keeps_the_pools_settings():
    """The pairs' settings and the magnification are free on --resume (head-fit settings) unless they make the triplet's pool."""
    photos = TrainConfig(images=("x",), loss="softmax+triplet", triplet_pairs="photos", magnification=10.0)
    views = replace(photos, triplet_pairs="surrogate")
    pool = {"magnification", "pair_photos", "pair_views", "pair_noise", "pair_jpeg", "pair_shading"}
    assert pool <= set(config_record(photos)) and not pool & set(config_record(views))
