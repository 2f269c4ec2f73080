"""Two-process CPU training with torchrun and fairseq's default DDP backend
(pytorch_ddp, which refuses parameters that get no gradient), then resuming."""

import re

import pytest
import torch
from conftest import fairseq_cmd, run
from helpers import USER_DIR

TRAIN = [
    "--user-dir", USER_DIR, "--arch", "ea_transformer", "--ea-cross-attn",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1000",
    "--cpu", "--distributed-backend", "gloo", "--log-interval", "1", "--no-epoch-checkpoints",
]


def _torchrun(bin_dir, save_dir, max_update):
    torchrun = fairseq_cmd("torchrun")
    return run([torchrun, "--standalone", "--nproc_per_node", "2", fairseq_cmd("fairseq-train"), bin_dir,
                *TRAIN, "--save-dir", save_dir, "--max-update", str(max_update)])


@pytest.mark.timeout(300)
def test_torchrun_two_processes_then_resume(reversal_data, tmp_path):
    _, bin_dir = reversal_data
    first = _torchrun(bin_dir, tmp_path, 4)
    log = first.stdout + first.stderr
    assert "distributed init (rank 1)" in log
    assert re.search(r"'ddp_backend': 'pytorch_ddp'", log)
    assert re.search(r"'find_unused_parameters': False", log)
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    assert any(".ea_conv." in k for k in state["model"])

    second = _torchrun(bin_dir, tmp_path, 8)
    log = second.stdout + second.stderr
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", log), log[-3000:]
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 8
