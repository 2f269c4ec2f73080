"""benchmarks/quality.sh at toy size: two settings x two seeds of a tiny model on a
slice of real Multi30k give a well-formed results file (per-run BLEU with signature,
chrF, updates and wall time; per-setting mean/std; paired tests against vanilla) and a
learning-curve PNG; a second call trains nothing; the log parser reads fairseq's lines."""

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from conftest import run
from helpers import REPO
from recipe_fixtures import SHARED

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import quality_report  # noqa: E402

pytestmark = pytest.mark.shared_data("multi30k")

TINY = ("--encoder-layers 1 --decoder-layers 2 --encoder-embed-dim 16 --decoder-embed-dim 16 "
        "--encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --max-tokens 1500 --num-workers 0")


def _slice_multi30k(dest, n_train=200, n_eval=24):
    """The real Multi30k .gz files, cut to a few lines."""
    dest.mkdir()
    for name, n in (("train", n_train), ("val", n_eval), ("test_2016_flickr", n_eval)):
        for lang in ("de", "en"):
            with gzip.open(SHARED / "multi30k" / f"{name}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            with gzip.open(dest / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(lines)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    _slice_multi30k(root / "multi30k")
    env = {**os.environ, "MULTI30K_DIR": str(root / "multi30k"), "OFFLINE": "1", "BPE_TOKENS": "200",
           "WORKERS": "1", "WORK": str(root / "work"), "DATA_BIN": str(root / "data-bin"),
           "RUNS_DIR": str(root / "runs"), "OUT": str(root / "results"), "SEEDS": "1 2", "ONLY": "vanilla|ea",
           "MAX_EPOCH": "2", "PATIENCE": "1", "NUM_AVG": "2", "PAIRED_BS_N": "50", "MODEL_ARGS": TINY,
           "GEN_ARGS": "--max-len-a 0 --max-len-b 12", "OMP_NUM_THREADS": "1"}
    proc = run(["bash", f"{REPO}/benchmarks/quality.sh", "multi30k"], env=env, timeout=900)
    return root, env, proc


def test_results_file_is_well_formed(toy):
    root, _env, proc = toy
    res = json.loads((root / "results" / "multi30k.json").read_text())
    assert res["corpus"] == "multi30k" and res["test_sentences"] == 24 and res["recipe"]["mode"] == "main"
    assert res["sacrebleu_signature"].startswith("nrefs:1|case:mixed|")
    assert res["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
    assert "bs:50" in res["paired_test"]["signatures"]["BLEU"]
    names = [s["setting"] for s in res["settings"]]
    assert names == ["vanilla", "ea", "ea-cross"]  # the mode's settings, in order
    by_name = {s["setting"]: s for s in res["settings"]}
    assert by_name["ea-cross"]["runs"] == []  # ONLY left it out: listed, not run
    for name in ("vanilla", "ea"):
        s = by_name[name]
        assert [r["seed"] for r in s["runs"]] == [1, 2]
        for r in s["runs"]:
            assert 0 <= r["sacrebleu"] <= 100 and 0 <= r["tokenized_bleu"] <= 100 and 0 < r["chrf"] <= 100
            assert r["epochs"] == 2 and r["stopped_by"] in ("cap", "patience")
            assert [p["epoch"] for p in r["curve"]] == [1, 2]
            assert 0 < r["curve"][0]["updates"] < r["curve"][1]["updates"] == r["updates"]
            assert 0 < r["updates_to_best"] <= r["updates"]
            assert r["wall_s"] >= r["wall_s_to_best"] > 0 and r["train_seconds_measured"] > 0
            assert r["best_valid_loss"] == min(p["valid_loss"] for p in r["curve"])
            assert os.path.exists(r["hypotheses"])
            assert r["patience"] == 1 and r["num_avg"] == 2 and r["max_epoch"] == 2 and r["model_args"] == TINY
        for key in ("sacrebleu", "tokenized_bleu", "chrf", "updates_to_best", "wall_s_to_best"):
            vals = [r[key] for r in s["runs"]]
            assert s[key]["n"] == 2 and s[key]["mean"] == pytest.approx(sum(vals) / 2, abs=1e-3)
            assert s[key]["std"] is not None and s[key]["std"] >= 0
    assert "vs_baseline" not in by_name["vanilla"]
    vs = by_name["ea"]["vs_baseline"]
    assert [t["seed"] for t in vs["per_seed"]] == [1, 2] and vs["pooled"]["seeds"] == [1, 2]
    for t in [*vs["per_seed"], vs["pooled"]]:
        for metric in ("bleu", "chrf"):
            assert 0 <= t[metric]["p_value"] <= 1
            assert t[metric]["delta"] == pytest.approx(t[metric]["system"] - t[metric]["baseline"], abs=0.011)
    # per-seed scores of the paired test are the runs' own
    assert vs["per_seed"][0]["bleu"]["system"] == pytest.approx(by_name["ea"]["runs"][0]["sacrebleu"], abs=0.011)
    assert "p BLEU" in proc.stdout and "ea " in proc.stdout


def test_log_file_holds_each_line_once(toy):
    """fairseq's --log-file (train.sh writes train.log) gets each epoch's lines once: fairseq
    0.12.2 added another file handler at every epoch, repeating epoch N's lines N times."""
    root, _, _ = toy
    log = (root / "runs" / "ea" / "seed1" / "train.log").read_text()
    valid = [line for line in log.splitlines() if "valid on 'valid' subset" in line]
    assert [re.search(r"epoch (\d+) \| valid on", line).group(1) for line in valid] == ["001", "002"], valid


def test_learning_curve_png(toy):
    root = toy[0]
    png = (root / "results" / "multi30k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 300 and len(png) > 20000


def test_second_call_trains_nothing_and_report_only(toy):
    root, env, _ = toy
    logs = {p: p.read_text() for p in (root / "runs").glob("*/seed*/run.log")}
    assert len(logs) == 4
    proc = run(["bash", f"{REPO}/benchmarks/quality.sh", "multi30k"], env=env, timeout=600)
    assert "training" not in proc.stderr
    assert {p: p.read_text() for p in logs} == logs
    (root / "results" / "multi30k.json").unlink()
    run(["bash", f"{REPO}/benchmarks/quality.sh", "multi30k", "--report"], env=env, timeout=600)
    assert json.loads((root / "results" / "multi30k.json").read_text())["settings"][1]["runs"]
    # pruned: the averaged model and checkpoint_best.pt stay, epoch checkpoints go
    seed1 = root / "runs" / "ea" / "seed1"
    assert (seed1 / "checkpoint_best.pt").exists() and not list(seed1.glob("checkpoint[0-9]*.pt"))
    assert (seed1 / "eval" / "checkpoint.avg2.pt").exists()


LOG = """\
2026-11-22 04:16:46 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9.297 | nll_loss 9.299 | ppl 630.05 | wps 223.5 | wpb 356.3 | bsz 13.3 | num_updates 17
2026-11-22 04:16:46 | INFO | train | epoch 001 | loss 9.27 | nll_loss 9.27 | ppl 617.21 | wps 292.9 | ups 0.46 | wpb 629.3 | bsz 23.5 | num_updates 17 | lr 0.00017 | gnorm 0.705 | train_wall 33 | wall 42
2026-11-22 04:17:00 | INFO | train_inner | epoch 002:     10 / 17 loss=9.1, nll_loss=9.0, ppl=512, wps=300, ups=0.5, wpb=600, bsz=20, num_updates=27, lr=0.00027, gnorm=0.6, train_wall=20, wall=62
epoch 002 | valid on 'valid' subset | loss 9.4 | nll_loss 9.3 | ppl 556.73 | wps 944.4 | wpb 356.3 | bsz 13.3 | num_updates 34 | best_loss 9.297
epoch 002 | loss 9.179 | nll_loss 9.171 | ppl 576.4 | wps 231.2 | ups 0.37 | wpb 629.3 | bsz 23.5 | num_updates 34 | lr 0.00034 | gnorm 0.677 | train_wall 45 | wall 88
2026-11-22 04:18:28 | INFO | fairseq_cli.train | early stop since valid performance hasn't improved for last 1 runs
"""


def test_log_parser_reads_fairseqs_lines(tmp_path):
    """Both forms fairseq writes (stdout with the logger prefix, --log-file without);
    train_inner lines are not epoch ends; the early stop is seen."""
    log = tmp_path / "train.log"
    log.write_text(LOG)
    parsed = quality_report.parse_log(log)
    assert parsed["stopped_by"] == "patience"
    assert parsed["curve"] == [
        {"epoch": 1, "updates": 17, "valid_loss": 9.297, "valid_nll_loss": 9.299, "wall_s": 42.0},
        {"epoch": 2, "updates": 34, "valid_loss": 9.4, "valid_nll_loss": 9.3, "wall_s": 88.0},
    ]
    log.write_text(LOG.replace("early stop", "done"))
    assert quality_report.parse_log(log)["stopped_by"] == "cap"
    log.write_text("nothing here\n")
    with pytest.raises(SystemExit, match="no \"valid on 'valid' subset\" line"):
        quality_report.parse_log(log)


def test_log_parser_continues_the_wall_clock_of_a_resumed_run(tmp_path):
    """fairseq's wall meter restarts with each process: after a resume from epoch 2's
    checkpoint, epoch 3 (wall 30 in the new process) lies at 88 + 30 s, and a repeated epoch
    keeps its last value."""
    resumed = LOG.split("2026-11-22 04:18:28")[0] + (
        "epoch 003 | valid on 'valid' subset | loss 9.0 | nll_loss 8.9 | ppl 1 | wps 1 | wpb 1 | bsz 1 | num_updates 51\n"
        "epoch 003 | loss 9.0 | nll_loss 9.0 | ppl 1 | wps 1 | ups 1 | wpb 1 | bsz 1 | num_updates 51 | train_wall 9 | wall 120\n"
        # killed after epoch 3 but before its checkpoint: the new process redoes epoch 3
        "epoch 003 | valid on 'valid' subset | loss 8.9 | nll_loss 8.8 | ppl 1 | wps 1 | wpb 1 | bsz 1 | num_updates 51\n"
        "epoch 003 | loss 9.0 | nll_loss 9.0 | ppl 1 | wps 1 | ups 1 | wpb 1 | bsz 1 | num_updates 51 | train_wall 9 | wall 30\n"
        "epoch 004 | valid on 'valid' subset | loss 8.8 | nll_loss 8.7 | ppl 1 | wps 1 | wpb 1 | bsz 1 | num_updates 68\n"
        "epoch 004 | loss 8.9 | nll_loss 8.9 | ppl 1 | wps 1 | ups 1 | wpb 1 | bsz 1 | num_updates 68 | train_wall 9 | wall 61\n"
    )
    log = tmp_path / "train.log"
    log.write_text(resumed)
    curve = quality_report.parse_log(log)["curve"]
    assert [(p["epoch"], p["valid_loss"], p["wall_s"]) for p in curve] == [
        (1, 9.297, 42.0), (2, 9.4, 88.0), (3, 8.9, 118.0), (4, 8.8, 149.0)]


def _settings_of_quality_sh():
    """The 'name|model|args' entries of benchmarks/quality.sh (both modes)."""
    import re

    text = open(f"{REPO}/benchmarks/quality.sh", encoding="utf-8").read()
    return sorted(set(re.findall(r'^\s+"([\w.-]+)\|(ea|vanilla)\|([^"]*)"$', text, flags=re.M)))


def test_every_setting_builds_a_model_and_optimizer():
    """Each setting's arguments parse, build their model, and (where given) their
    optimizer, as train.sh's command line would: a typo fails here, not hours into a run."""
    import shlex

    import torch
    from fairseq import optim

    from helpers import build_model, parse_model_args

    settings = _settings_of_quality_sh()
    names = {name for name, _, _ in settings}
    assert {"vanilla", "ea", "ea-cross", "alpha0.2", "alpha1.0", "beta0.8", "kernel1", "kernel5", "relu",
            "leaky_relu", "conv-no-wd"} <= names
    for name, model, args in settings:
        arch = "ea_transformer" if model == "ea" else "transformer"
        extra = ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.001", "--weight-decay", "0.0001",
                 *shlex.split(args)]
        m = build_model(arch, extra, dtype=torch.float32)
        opt = optim.build_optimizer(parse_model_args(arch, list(extra)), list(m.parameters()))
        assert opt.optimizer.param_groups[0]["weight_decay"] == 0.0001, name
        if name == "conv-no-wd":
            assert [g["weight_decay"] for g in opt.optimizer.param_groups] == [0.0001, 0.0]


def test_name_names_the_results_and_is_checked(tmp_path):
    """A NAME (of results/<NAME>.json and the run folders) that could leave the folder
    stops before anything is prepared."""
    env = {**os.environ, "NAME": "../elsewhere", "DATA_BIN": str(tmp_path / "none"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", f"{REPO}/benchmarks/quality.sh", "multi30k"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "NAME=../elsewhere: expected letters" in proc.stderr, proc.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()


def test_cpu_preset_prepares_its_subset_and_trains_the_small_model(tmp_path):
    """`quality.sh europarl8k` (a preset behind results/) prepares the first 8,000 Europarl
    lines with a 2k BPE and trains the small model with the epoch cap, as recorded in its
    results: here cut to 3 updates and short hypotheses."""
    env = {**os.environ, "DATA_BIN": str(tmp_path / "data-bin"), "WORK": str(tmp_path / "work"),
           "RUNS_DIR": str(tmp_path / "runs"), "OUT": str(tmp_path / "results"), "SEEDS": "1", "ONLY": "vanilla",
           "MAX_UPDATE": "3", "NUM_AVG": "1", "GEN_ARGS": "--max-len-a 0 --max-len-b 3", "WORKERS": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("MODEL_ARGS", None)
    env.pop("MAX_EPOCH", None)
    run(["bash", f"{REPO}/benchmarks/quality.sh", "europarl8k"], env=env, timeout=900)
    prepared = (tmp_path / "data-bin" / "PREPARED").read_text()
    assert "bpe_tokens=2000" in prepared and "train_lines=8000" in prepared
    meta = json.loads((tmp_path / "runs" / "vanilla" / "seed1" / "run.json").read_text())
    assert meta["model_args"].split() == ["--encoder-layers", "2", "--decoder-layers", "2",
                                          "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
                                          "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256"]
    assert meta["max_epoch"] == 120
    log = (tmp_path / "runs" / "vanilla" / "seed1" / "train.log").read_text()
    assert "'max_epoch': 120" in log and "encoder_embed_dim=64" in log and "encoder_layers=2" in log
    res = json.loads((tmp_path / "results" / "europarl8k.json").read_text())
    assert res["corpus"] == "europarl8k" and res["test_sentences"] == 1000
    assert [len(s["runs"]) for s in res["settings"]] == [1, 0, 0]
