"""Data-parallel training under torchrun, on the CPU with Gloo: 2 processes, 2 'nodes' over loopback,
interruption and --resume with another world size."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import exemplar_desc
from exemplar_desc import train as train_module

REPO = Path(exemplar_desc.__file__).resolve().parents[1]
TINY = ["--num-classes", "8", "--seeds-per-image", "8", "--batch-size", "16", "--pca-patches", "256",
        "--head-dim", "16", "--magnification", "8", "--device", "cpu", "--name", "m"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "exemplar_desc.train"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_run(work: Path, out: Path, world_size: int) -> dict:
    """One checkpoint, one log, one model; the loss fell; the card records the world size."""
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt", "log.json"]
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.pt"]
    log = json.loads((work / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    card = json.loads((out / "m.json").read_text())
    assert card["training"]["world_size"] == world_size and card["training"]["global_batch_size"] == 16 * world_size
    return card


def test_torchrun_two_processes(folder_of_four, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = [str(folder_of_four), *TINY, "--samples-per-class", "32", "--epochs", "3", "--workdir", str(work), "--out-dir", str(out)]
    done = subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2") + args, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    card = _check_run(work, out, 2)
    assert card["training"]["device"] == "2 x cpu"
    assert card["training"]["samples_seen"] == 3 * 8 * 32 and card["training"]["steps"] == 3 * 8 * 32 // 32
    assert done.stdout.count("model written to") == 1  # rank 0 alone prints and writes


def test_two_nodes_over_loopback(folder_of_four, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = [str(folder_of_four), *TINY, "--samples-per-class", "32", "--epochs", "3", "--workdir", str(work), "--out-dir", str(out)]
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            _torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc_per_node", "1", "--master-addr", "127.0.0.1", "--master-port", port) + args,
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=120)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    _check_run(work, out, 2)


def _two_ranks_until_checkpoint(args: list[str], work: Path) -> subprocess.Popen:
    """Start a two-process run and wait (at most 90 s) until it has written its first checkpoint."""
    job = subprocess.Popen(_torchrun("--standalone", "--nproc_per_node", "2") + args, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while not (work / "checkpoint.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    return job


def test_interrupted_two_process_run_resumes_in_one(folder_of_four, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = [str(folder_of_four), *TINY, "--samples-per-class", "60", "--epochs", "3", "--checkpoint-minutes", "0.002",
            "--workdir", str(work), "--out-dir", str(out)]
    job = _two_ranks_until_checkpoint(args, work)
    job.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    output = job.communicate(timeout=60)[0]
    assert job.returncode != 0, output[-3000:]
    assert "interrupted by SIGTERM at step" in output and "--resume" in output, output[-3000:]
    ckpt = torch.load(work / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["samples"] < 3 * 8 * 60 and ckpt["samples"] == ckpt["step"] * 32
    assert not out.exists()

    # One process continues the run: progress is counted in samples, so the world size may change.
    assert train_module.main([*args, "--resume", "--threads", "1"]) == 0
    card = _check_run(work, out, 1)
    assert card["training"]["device"] == "2 x cpu, then cpu"
    assert card["training"]["samples_seen"] >= 3 * 8 * 60 > card["training"]["samples_seen"] - 32


def _rank_pid(work: Path, rank: int) -> int:
    """The process id of the training rank ``rank`` whose command line names ``work``."""
    pids = [
        int(p.name) for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(work).encode() in _read(p / "cmdline") and f"\0RANK={rank}\0".encode() in b"\0" + _read(p / "environ")
    ]
    assert len(pids) == 1
    return pids[0]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(folder_of_four, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = [str(folder_of_four), *TINY, "--samples-per-class", "2000", "--checkpoint-minutes", "0.002",
            "--workdir", str(work), "--out-dir", str(out)]
    job = _two_ranks_until_checkpoint(args, work)
    os.kill(_rank_pid(work, 1), signal.SIGTERM)  # rank 0 gets no signal: it learns of it from rank 1
    output = job.communicate(timeout=60)[0]
    assert job.returncode != 0
    assert "interrupted by SIGTERM at step" in output, output[-3000:]  # printed by rank 0
    assert "error: rank" not in output, output[-3000:]  # no rank lost its peer
    step = int(output.split("interrupted by SIGTERM at step ")[1].split(":")[0])
    assert step % 10 == 0  # the step the ranks agreed on
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == step


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_that_dies_ends_the_job(folder_of_four, tmp_path):
    work = tmp_path / "work"
    args = [str(folder_of_four), *TINY, "--samples-per-class", "2000", "--checkpoint-minutes", "0.002", "--workdir", str(work), "--out-dir", str(tmp_path / "out")]
    job = _two_ranks_until_checkpoint(args, work)
    os.kill(_rank_pid(work, 1), signal.SIGKILL)
    killed = time.time()
    output = job.communicate(timeout=60)[0]
    assert time.time() - killed < 30  # no hang until the collective timeout
    assert job.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in output and "SIGKILL" in output  # torchrun names the failed rank
    assert "error: rank 0: " in output


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
