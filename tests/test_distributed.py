"""DSparkTrainer and Eagle3Trainer under a two-process DDP launch (gloo on CPU): the ranks stay in sync."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_train.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("family", ["dspark", "eagle3"])
def test_ddp_ranks_train_the_same_draft(tmp_path, family):
    """Each rank samples its own anchors (DSpark: the anchor key holds the process index) or sees other sequences
    (EAGLE-3), so only gradients synchronised through the DDP wrapper leave both ranks with the same weights; logged
    metrics are reduced over ranks, so they agree too."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(SCRIPT), str(tmp_path), family,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["wrapper"] == "DistributedDataParallel"
        assert report["target_unchanged"] and report["draft_changed"]
        assert len(report["losses"]) == 3 and all(loss == loss for loss in report["losses"])
    assert reports[0]["losses"] == reports[1]["losses"]
    assert reports[0]["expected_tau"] == reports[1]["expected_tau"]
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
