"""merge_parts: part files of a distributed run into the one file a single process writes."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from exemplar_desc.formats.hloc import merge_parts

ATTRS = {"format": "test/1", "descriptor": "sift", "max_size": 200}


def _part(path, groups, complete=True, **attrs):
    """A part file: root attributes ``ATTRS`` (+ ``attrs``), one group per key with two datasets and an attribute."""
    with h5py.File(path, "w") as f:
        f.attrs.update({**ATTRS, **attrs, "complete": complete})
        for i, key in enumerate(groups):
            group = f.create_group(key)
            group.create_dataset("keypoints", data=np.full((3, 2), i, np.float32))
            group.create_dataset("image_size", data=np.array([40, 30 + i], np.int32))
            group.attrs["sha1"] = f"sha-{key}"
    return path


def test_merge_copies_every_group_with_datasets_and_attributes(tmp_path):
    a = _part(tmp_path / "a.h5", ["x.png", "dir/z.png"])
    b = _part(tmp_path / "b.h5", ["y.png", "dir/w.png"])
    keys = ["dir/w.png", "x.png", "y.png", "dir/z.png"]
    merge_parts([a, b], tmp_path / "out.h5", keys)
    with h5py.File(tmp_path / "out.h5", "r") as out, h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert dict(out.attrs) == {**ATTRS, "complete": True}
        assert type(out.attrs["complete"]) is np.bool_ and type(out.attrs["max_size"]) is type(fa.attrs["max_size"])
        assert sorted(out) == ["dir", "x.png", "y.png"] and sorted(out["dir"]) == ["w.png", "z.png"]
        for key in keys:
            source = fa if key in fa else fb
            assert dict(out[key].attrs) == dict(source[key].attrs)
            for name in ("keypoints", "image_size"):
                assert out[key][name].dtype == source[key][name].dtype
                np.testing.assert_array_equal(out[key][name][()], source[key][name][()])
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "out.h5"]  # no temporary file left


def test_merge_of_pair_paths_and_a_subset(tmp_path):
    a = _part(tmp_path / "a.h5", ["a.png/b.png", "a.png/c.png"])
    b = _part(tmp_path / "b.h5", ["b.png/c.png"])
    merge_parts([a, b], tmp_path / "out.h5", ["a.png/b.png", "b.png/c.png"])
    with h5py.File(tmp_path / "out.h5", "r") as out:
        assert {f"{x}/{y}" for x in out for y in out[x]} == {"a.png/b.png", "b.png/c.png"}


def test_incomplete_part_is_refused_and_nothing_written(tmp_path):
    a = _part(tmp_path / "a.h5", ["x.png"])
    b = _part(tmp_path / "b.h5", ["y.png"], complete=False)
    (tmp_path / "out.h5").write_bytes(b"previous")
    with pytest.raises(ValueError, match="b.h5 is incomplete"):
        merge_parts([a, b], tmp_path / "out.h5", ["x.png", "y.png"])
    assert (tmp_path / "out.h5").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "out.h5"]


def test_part_without_completeness_mark_is_refused(tmp_path):
    a = _part(tmp_path / "a.h5", ["x.png"])
    with h5py.File(a, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        merge_parts([a], tmp_path / "out.h5", ["x.png"])
    assert not (tmp_path / "out.h5").exists()


def test_parts_with_other_settings_are_refused(tmp_path):
    a = _part(tmp_path / "a.h5", ["x.png"])
    b = _part(tmp_path / "b.h5", ["y.png"], max_size=400)
    with pytest.raises(ValueError, match="different settings"):
        merge_parts([a, b], tmp_path / "out.h5", ["x.png", "y.png"])
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("keys, held", [(["x.png", "missing.png"], "in 0 of"), (["x.png"], "in 2 of")])
def test_key_in_no_part_or_in_two_is_refused(tmp_path, keys, held):
    a = _part(tmp_path / "a.h5", ["x.png"])
    b = _part(tmp_path / "b.h5", ["x.png" if held == "in 2 of" else "y.png"])
    with pytest.raises(ValueError, match=held):
        merge_parts([a, b], tmp_path / "out.h5", keys)
    assert not (tmp_path / "out.h5").exists()
