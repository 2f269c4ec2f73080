"""The CPU side of the GPU acceptance check (benchmarks/gpu_check.sh / gpu_check.py)."""

import json
import os
import subprocess
import sys

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402

NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES="")


def test_without_a_gpu_it_checks_nothing_says_so_last_and_exits_0(tmp_path):
    for cmd in ([sys.executable, f"{REPO}/benchmarks/gpu_check.py", "--out", tmp_path / "r.json"],
                ["bash", f"{REPO}/benchmarks/gpu_check.sh", "--out", tmp_path / "r.json"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(NO_GPU, EA_PYTHON=sys.executable))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: no CUDA GPU on this machine")
        assert not (tmp_path / "r.json").exists()


def test_the_implementation_check_runs_on_the_cpu_and_writes_its_file(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, f"{REPO}/benchmarks/gpu_check.py", "--device", "cpu", "--only", "impls",
                           "--out", out, "--workdir", tmp_path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failed"] == []
    assert [r["precision"] for r in report["impls"]] == ["fp32", "bf16"]
    fp32 = report["impls"][0]
    assert fp32["beam_search_same_hypotheses"] and fp32["worst_rel_error_vs_fp32_eager"]["fused"] < 1e-4
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: all checks passed")


def test_a_missing_data_folder_and_an_unknown_part_are_named(tmp_path):
    proc = subprocess.run([sys.executable, f"{REPO}/benchmarks/gpu_check.py", "--device", "cpu", "--only", "train",
                           "--data-bin", tmp_path / "nowhere"], capture_output=True, text=True)
    assert proc.returncode == 2 and "nowhere/dict.de.txt not found, needed by the 'train' part" in proc.stderr
    proc = subprocess.run([sys.executable, f"{REPO}/benchmarks/gpu_check.py", "--only", "impls,speed"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--only: unknown part(s) speed" in proc.stderr


def _log(losses, overflows=0, done=True):
    lines = [f"2026-12-06 10:00:00 | INFO | train_inner | epoch 001:     {25 * (i + 1)} / 130 loss={x}, nll_loss=1.0"
             for i, x in enumerate(losses)]
    lines += ["2026-12-06 10:00:01 | INFO | fairseq.trainer | NOTE: gradient overflow detected, ignoring gradient,"
              " setting loss scale to: 64.0"] * overflows
    if done:
        lines.append("2026-12-06 10:00:02 | INFO | fairseq_cli.train | done training in 12.0 seconds")
    return "\n".join(lines)


def test_train_log_health():
    healthy = gpu_check.parse_train_log(_log([9.1, 7.2, 6.0], overflows=3), updates=300)
    assert healthy["ok"] and healthy["losses"] == [9.1, 7.2, 6.0] and healthy["overflows"] == 3
    assert not gpu_check.parse_train_log(_log([9.1, "nan", 6.0]), 300)["ok"]  # a NaN loss
    assert not gpu_check.parse_train_log(_log([9.1, 9.3]), 300)["ok"]  # the loss did not go down
    assert not gpu_check.parse_train_log(_log([9.1, 6.0], overflows=30), 300)["ok"]  # an overflow loop
    assert not gpu_check.parse_train_log(_log([9.1, 6.0], done=False), 300)["ok"]  # stopped early
