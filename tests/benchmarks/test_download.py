"""The Oxford downloader against a local HTTP server serving archives built here."""

import functools
import http.server
import io
import json
import tarfile
import threading

import cv2
import numpy as np
import pytest

from benchmarks.download import URL_ENV, download_oxford, sha256sum


def _archive(path, name, drop=(), extra_path=False):
    """A tar.gz like the Oxford ones: img1..6.ppm and H1to2p..H1to6p (optionally in a sub-folder)."""
    with tarfile.open(path, "w:gz") as tar:
        def add(member, data):
            info = tarfile.TarInfo(f"{name}/{member}" if extra_path else member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for k in range(1, 7):
            image = np.random.default_rng(k).integers(0, 256, (24, 32, 3), dtype=np.uint8)
            if f"img{k}" not in drop:
                add(f"img{k}.ppm", cv2.imencode(".ppm", image)[1].tobytes())
            if k > 1 and f"H1to{k}p" not in drop:
                add(f"H1to{k}p", f"1 0 {k}\n0 1 0\n0 0 1\n".encode())
        add("../escape.txt", b"must not be written")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/affine"
    httpd.shutdown()
    httpd.server_close()


def test_download_verify_unpack_and_reverify(server, tmp_path):
    www, url = server
    (www / "affine").mkdir()
    _archive(www / "affine" / "graf.tar.gz", "graf")
    _archive(www / "affine" / "boat.tar.gz", "boat", extra_path=True)
    _archive(www / "affine" / "bark.tar.gz", "bark", drop=("H1to4p",))
    cache = tmp_path / "cache"
    root, errors = download_oxford(cache, names=["graf", "boat", "bark", "ubc"], base_url=url, timeout=5)
    assert root == cache
    assert set(errors) == {"bark", "ubc"}
    assert "H1to4p" in errors["bark"]
    assert "404" in errors["ubc"] or "Not Found" in errors["ubc"]
    assert not (cache / "bark").exists() and not (cache / ".archives" / "bark.tar.gz").exists()
    for name in ("graf", "boat"):
        files = sorted(p.name for p in (cache / name).iterdir())
        assert files == [f"H1to{k}p" for k in range(2, 7)] + [f"img{k}.ppm" for k in range(1, 7)]
    assert not (cache / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    record = json.loads((cache / ".archives" / "sha256.json").read_text())
    assert record["graf"] == sha256sum(cache / ".archives" / "graf.tar.gz")
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [".archives"]  # no temporary leftovers
    assert sorted(p.name for p in (cache / ".archives").iterdir()) == ["boat.tar.gz", "graf.tar.gz", "sha256.json"]

    # Second call: verified from the record, nothing fetched (the server no longer has the file).
    (www / "affine" / "graf.tar.gz").unlink()
    _, errors = download_oxford(cache, names=["graf"], base_url=url, timeout=5)
    assert errors == {}

    # A damaged kept archive fails re-verification and is fetched again.
    _archive(www / "affine" / "graf.tar.gz", "graf")
    (cache / ".archives" / "graf.tar.gz").write_bytes(b"garbage")
    _, errors = download_oxford(cache, names=["graf"], base_url=url, timeout=5)
    assert errors == {}
    assert json.loads((cache / ".archives" / "sha256.json").read_text())["graf"] == sha256sum(www / "affine" / "graf.tar.gz")


def test_base_url_from_environment_and_bad_archive(server, tmp_path, monkeypatch):
    www, url = server
    (www / "affine").mkdir()
    (www / "affine" / "wall.tar.gz").write_bytes(b"this is not a tar archive")
    monkeypatch.setenv(URL_ENV, url)
    _, errors = download_oxford(tmp_path / "cache", names=["wall"], timeout=5)
    assert "not a readable tar archive" in errors["wall"]
    assert not (tmp_path / "cache" / "wall").exists()


def test_cli_download_then_benchmark(server, tmp_path, monkeypatch, capsys):
    from benchmarks.matching import main

    www, url = server
    (www / "affine").mkdir()
    _archive(www / "affine" / "graf.tar.gz", "graf")
    monkeypatch.setenv(URL_ENV, url)
    out = tmp_path / "out"
    code = main(["--download", "oxford", "--cache", str(tmp_path / "cache"), "--descriptors", "sift",
                 "--num-features", "50", "--no-progress", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "download of wall failed" in captured.err and "download of graf failed" not in captured.err
    assert "skipped sequence" not in captured.err  # the cache holds nothing but sequences for the loader
    results = json.loads((out / "results.json").read_text())
    # tiny noise images: few or no keypoints, but the run completes and reports the pairs
    assert list(results["descriptors"]["sift"]["sequences"]) == ["graf"]
    assert len(results["descriptors"]["sift"]["sequences"]["graf"]["pairs"]) == 5
