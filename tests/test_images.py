"""The one image lister and the image readers shared by training, extraction and SfM."""

import cv2
import numpy as np
import pytest

from exemplar_desc.images import UnreadableImageError, decode_gray, gather_images, list_images


def test_list_images_is_recursive_sorted_relative_and_filters(tmp_path):
    (tmp_path / "sub").mkdir()
    image = np.zeros((8, 8), np.uint8)
    for name in ("sub/b.png", "a.JPG", "c.pgm"):
        cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")  # listed: reading decides, not the name
    (tmp_path / "notes.txt").write_text("ignored")
    assert list_images(tmp_path) == ["a.JPG", "broken.jpg", "c.pgm", "sub/b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")



def test_gather_images_takes_folders_and_files_in_order(tmp_path):
    image = np.zeros((8, 8), np.uint8)
    for name in ("d/b.png", "d/a.png", "single.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "notes.txt").write_text("not an image")
    assert gather_images([tmp_path / "single.jpg", tmp_path / "d"]) == [
        tmp_path / "single.jpg", tmp_path / "d" / "a.png", tmp_path / "d" / "b.png"]
    with pytest.raises(ValueError, match="not an image file"):
        gather_images([tmp_path / "notes.txt"])
    with pytest.raises(FileNotFoundError, match="neither"):
        gather_images([tmp_path / "missing"])


def test_decode_gray_rejects_garbage_and_truncated_jpeg():
    ok, data = cv2.imencode(".jpg", np.full((16, 16), 128, np.uint8))
    assert decode_gray(data.tobytes()).shape == (16, 16)
    with pytest.raises(UnreadableImageError, match="truncated"):
        decode_gray(data.tobytes()[:-2], "x.jpg")
    with pytest.raises(UnreadableImageError, match="not a readable image"):
        decode_gray(b"garbage", "x.png")
