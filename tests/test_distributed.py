"""Data-parallel calibration: two gloo processes give the single-process result on the same windows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import embedded_available, random_tokens, tiny_llama

from lokitool.calib.calibration import Calibration
from lokitool.calib.config import CalibrateConfig
from lokitool.calib.data import Windows
from lokitool.calib.distributed import World, process_group, shard
from lokitool.calib.run import CalibrationJob, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(output: Path) -> CalibrationJob:
    loaded = tiny_llama(num_heads=4, num_kv_heads=2, seed=3)
    tokens = random_tokens(7, 24, seed=11)  # 7 windows: ranks get 4 and 3
    config = CalibrateConfig(num_tokens=tokens.numel(), seq_len=24, output=output, batch_size=2, device="cpu")
    return CalibrationJob(config=config, loaded=loaded, windows=Windows(tokens=tokens, dataset="random", bos=True))


def _worker(rank: int, size: int, port: int, output: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with process_group("cpu") as world:
        assert world == World(rank, size, rank)
        run(_job(Path(output)), world=world)


def test_shards_cover_every_window_once():
    tokens = torch.arange(7)[:, None].expand(7, 3)
    seen = torch.cat([shard(tokens, World(r, 3, r))[:, 0] for r in range(3)])
    assert sorted(seen.tolist()) == list(range(7))


def test_two_gloo_processes_equal_one(tmp_path):
    single = tmp_path / "single.safetensors"
    run(_job(single))
    double = tmp_path / "double.safetensors"
    mp.start_processes(_worker, args=(2, _free_port(), str(double)), nprocs=2, join=True, start_method="spawn")
    a, b = Calibration.load(single), Calibration.load(double)
    assert b.info["processes"] == 2 and a.info["processes"] == 1
    for kind in ("pre", "post"):
        torch.testing.assert_close(b.pca[kind].eigenvalues, a.pca[kind].eigenvalues, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.pca[kind].mean, a.pca[kind].mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.pca[kind].covariance(), a.pca[kind].covariance(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.query_moment[kind], a.query_moment[kind], rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double.safetensors", "single.safetensors"]


@pytest.mark.embedded
@pytest.mark.skipif(not embedded_available(), reason="embedded model not installed")
def test_torchrun_cli_on_cpu(tmp_path):
    """`torchrun --nproc-per-node 2 -m lokitool calibrate` as a user runs it, against one process."""
    common = ["calibrate", "--num-tokens", "256", "--seq-len", "64", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lokitool", *common, "--output", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
                          "-m", "lokitool", *common, "--output", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # rank 0 alone reports and writes
    a, b = Calibration.load(tmp_path / "one.safetensors"), Calibration.load(tmp_path / "two.safetensors")
    torch.testing.assert_close(b.pca["post"].eigenvalues, a.pca["post"].eigenvalues, rtol=1e-4, atol=1e-6)
    assert b.info["processes"] == 2
