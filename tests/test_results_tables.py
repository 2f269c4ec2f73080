"""The result tables in README.md and docs/*.md are those scripts/results_tables.py writes
from results/*.json: none is typed by hand, none is stale."""

import json
import shutil
import subprocess
import sys

from helpers import REPO

SCRIPT = f"{REPO}/scripts/results_tables.py"


def test_committed_tables_match_their_results_files():
    proc = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_changed_results_file_makes_its_table_stale(tmp_path, monkeypatch):
    sys.path.insert(0, f"{REPO}/scripts")
    import results_tables

    (tmp_path / "results").mkdir()
    shutil.copy(f"{REPO}/results/multi30k10k.json", tmp_path / "results" / "m.json")
    monkeypatch.setattr(results_tables, "REPO", tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- table: quality results/m.json -->\nhand-typed\n<!-- end table -->\nafter\n")
    assert results_tables.main(["--check", str(doc)]) == 1  # the hand-typed table is stale
    assert results_tables.main([str(doc)]) == 0
    text = doc.read_text()
    assert "hand-typed" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "| ea | 3 | 29.62 ± 0.63 |" in text
    assert results_tables.main(["--check", str(doc)]) == 0
    data = json.loads((tmp_path / "results" / "m.json").read_text())
    data["settings"][1]["sacrebleu"]["mean"] = 99.0
    (tmp_path / "results" / "m.json").write_text(json.dumps(data))
    assert results_tables.main(["--check", str(doc)]) == 1
