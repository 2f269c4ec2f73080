"""The benchmark scripts run (tiny sizes) and report what they measured."""

import json
import sys

import pytest

from conftest import run
from helpers import REPO
from recipe_fixtures import SHARED

pytestmark = pytest.mark.shared_data("iwslt14", "fairseq_bpe10k")


def test_cost_benchmark_runs_and_reports(tmp_path):
    out, png = tmp_path / "cost.json", tmp_path / "cost.png"
    cmd = [sys.executable, REPO + "/benchmarks/cost.py", "--data", SHARED / "iwslt14" / "fairseq_bpe10k",
           "--variants", "vanilla,ea:eager,ea", "--lengths", "1,2", "--max-tokens", "300",
           "--model-args", "--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 --decoder-embed-dim 64",
           "--decode-sentences", "2", "--decode-steps", "3", "--repeats", "2", "--threads", "1",
           "--clock", "cpu", "--workdir", tmp_path / "work", "--json", out, "--plot", png]
    table = run(cmd, cwd=tmp_path).stdout
    saved = json.loads(out.read_text())
    # the script restarted itself with glibc's heap kept for reuse (--heap keep, the default)
    assert "threads 1, fp32, cpu clock, heap kept" in saved["header"]
    assert [b["factor"] for b in saved["lengths"]] == [1, 2]
    for block in saved["lengths"]:
        rows = {r["variant"]: r for r in block["results"]}
        assert set(rows) == {"vanilla", "ea:eager", "ea"}
        for r in rows.values():
            assert len(r["update_ms_all"]) == len(r["decode_ms_all"]) == 2
            assert r["saved_mib"] > 0
        # the fused path keeps fewer bytes than the eager one
        assert rows["ea"]["saved_mib"] < rows["ea:eager"]["saved_mib"]
        # EA adds one conv per layer after the first, and nothing else
        assert rows["ea"]["params"] > rows["vanilla"]["params"]
        # time ratios: the median of the per-repeat ratios, inside their middle half
        for key in ("update", "decode"):
            per_repeat = [a / b for a, b in zip(rows["ea"][f"{key}_ms_all"], rows["vanilla"][f"{key}_ms_all"])]
            low, high = rows["ea"][f"{key}_ratio_iqr"]
            assert rows["ea"][f"{key}_ratio"] == pytest.approx(sorted(per_repeat)[0] / 2 + sorted(per_repeat)[1] / 2)
            assert min(per_repeat) <= low <= rows["ea"][f"{key}_ratio"] <= high <= max(per_repeat)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report prints the same tables from the file
    again = run([sys.executable, REPO + "/benchmarks/cost.py", "--report", out], cwd=tmp_path).stdout
    assert again.strip() in table


def test_cost_benchmark_rejects_bad_lengths(tmp_path):
    proc = __import__("subprocess").run(
        [sys.executable, REPO + "/benchmarks/cost.py", "--lengths", "0,x", "--workdir", tmp_path],
        capture_output=True, text=True)
    assert proc.returncode != 0 and "--lengths" in proc.stderr


def test_cost_benchmark_cpu_clock_needs_one_thread(tmp_path):
    """The thread's CPU time misses the work of other threads: refused unless there is one."""
    proc = __import__("subprocess").run(
        [sys.executable, REPO + "/benchmarks/cost.py", "--clock", "cpu", "--threads", "2", "--workdir", tmp_path],
        capture_output=True, text=True)
    assert proc.returncode != 0 and "--clock cpu times the calling thread only" in proc.stderr


def test_cost_batches_fairseq_order_and_file_order():
    """--order fairseq: sentences of similar length from the median on (little padding);
    --order file: the first sentences, padded to the longest of them."""
    import torch

    sys.path.insert(0, REPO + "/benchmarks")
    import cost

    data = SHARED / "iwslt14" / "fairseq_bpe10k"
    from fairseq.data import Dictionary

    d = Dictionary()
    for lang in ("de", "en"):
        Dictionary.add_file_to_dictionary(str(data / f"test.{lang}"), d, lambda s: s.split(), 1)
    d.finalize()
    src_lens = sorted(len(line.split()) for line in (data / "test.de").read_text().splitlines())
    batches = {o: cost.make_batch(d, data, 600, 1, torch.device("cpu"), order=o)[0] for o in ("fairseq", "file")}
    real = {o: (b["src_tokens"] != d.pad()).sum(1) - 1 for o, b in batches.items()}  # without </s>
    assert real["fairseq"].min() >= src_lens[len(src_lens) // 2]  # from the median sentence on
    assert real["fairseq"].max() - real["fairseq"].min() <= 2  # similar lengths
    assert real["file"].max() - real["file"].min() > 10  # the file's first lines differ widely
    fill = {o: (b["src_tokens"] != d.pad()).float().mean().item() for o, b in batches.items()}
    assert fill["fairseq"] > 0.9 > fill["file"]
