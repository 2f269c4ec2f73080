"""The benchmark scripts run (tiny sizes) and report what they measured."""

import json
import sys

from conftest import run
from helpers import REPO
from recipe_fixtures import SHARED


def test_cost_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, REPO + "/benchmarks/cost.py", "--data", SHARED / "iwslt14" / "fairseq_bpe10k",
           "--variants", "vanilla,ea", "--max-tokens", "400", "--decode-sentences", "2",
           "--decode-steps", "3", "--repeats", "2", "--threads", "1", "--workdir", tmp_path / "work",
           "--json", out]
    table = run(cmd, cwd=tmp_path).stdout
    saved = json.loads(out.read_text())
    rows = {r["variant"]: r for r in saved["results"]}
    assert set(rows) == {"vanilla", "ea"}
    for r in rows.values():
        assert len(r["update_ms_all"]) == len(r["decode_ms_all"]) == 2
        assert r["update_ms"] > 0 and r["decode_ms"] > 0
    assert rows["vanilla"]["update_ratio"] == rows["vanilla"]["decode_ratio"] == 1.0
    # EA adds one conv per layer after the first, and nothing else
    assert rows["ea"]["params"] > rows["vanilla"]["params"]
    # --report prints the same table from the file
    again = run([sys.executable, REPO + "/benchmarks/cost.py", "--report", out], cwd=tmp_path).stdout
    assert again.strip() == table.strip().split("\n\n")[-1].strip()
