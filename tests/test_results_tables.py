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


def test_scale_table_has_a_row_per_size_and_says_what_each_gain_means():
    sys.path.insert(0, f"{REPO}/scripts")
    import results_tables

    def arm(mean, done, planned):
        return {"sacrebleu": {"mean": mean, "std": 0.5 if done > 1 else None}, "seeds_done": list(range(done)),
                "seeds_planned": list(range(planned))}

    gain = {"delta": 1.25, "ci95": [0.5, 2.0], "verdict": "ahead, beyond the seed spread"}
    data = {"progress": {"runs_done": 5, "runs_planned": 8}, "sacrebleu_signature": "nrefs:1|case:mixed",
            "corpora": [{"corpus": "c1", "sizes": [
                {"size": "s1", "layers": 2, "params": 616448,
                 "arms": {"vanilla": arm(30.0, 2, 2), "ea": arm(31.25, 2, 2), "residual": arm(30.5, 1, 2)},
                 "comparisons": [{"system": "ea", "baseline": "vanilla", "gain_bleu": gain},
                                 {"system": "ea", "baseline": "residual", "status": "missing"}]},
                {"size": "s2", "layers": 3, "params": 7.06e6, "arms": {"vanilla": arm(None, 0, 2)},
                 "comparisons": []}]}]}
    text = results_tables.scale(data)
    lines = text.splitlines()
    assert lines[0] == "| corpus | size | params | vanilla | ea | residual | Δ EA vs vanilla | Δ EA vs residual |"
    assert lines[2] == ("| c1 | s1 (2+2) | 0.62M | 30.00 ± 0.50 (2/2) | 31.25 ± 0.50 (2/2) | 30.50 (1/2) "
                        "| +1.25 [+0.50, +2.00] |  |")
    assert lines[3] == "| c1 | s2 (3+3) | 7.06M | - (0/2) |  |  |  |  |"
    assert "5 of 8 runs done" in text and "`nrefs:1|case:mixed`" in text
    assert "- c1 s1, EA vs vanilla: +1.25 BLEU, ahead, beyond the seed spread." in text
    assert "residual-only" not in text  # no gain against residual yet: no sentence about it


def test_scale_note_says_whether_the_gain_shrinks_holds_or_grows_with_size():
    sys.path.insert(0, f"{REPO}/scripts")
    import results_tables

    def corpus(name, *gains):
        sizes = [{"size": f"d{64 * 2 ** i}", "layers": 2, "params": None, "arms": {},
                  "comparisons": [{"system": "ea", "baseline": "vanilla",
                                   "gain_bleu": {"delta": d, "ci95": [lo, hi], "verdict": "v"}}]}
                 for i, (d, lo, hi) in enumerate(gains)]
        return {"corpus": name, "sizes": sizes}

    data = {"progress": {"runs_done": 1, "runs_planned": 2}, "corpora": [
        corpus("held", (1.5, 0.7, 2.3), (0.7, -0.1, 1.5), (1.7, 0.9, 2.6)),
        corpus("shrunk", (2.0, 1.5, 2.5), (0.2, -0.3, 0.7)),
        corpus("grown", (0.2, -0.3, 0.7), (2.0, 1.5, 2.5)),
        corpus("single", (1.0, 0.5, 1.5))]}
    text = results_tables.scale(data)
    assert ("- held, EA's gain over vanilla by size: +1.50 (d64), +0.70 (d128), +1.70 (d256); "
            "it holds from d64 to d256: no change beyond their 95% intervals.") in text
    assert "- shrunk, EA's gain over vanilla by size: +2.00 (d64), +0.20 (d128); it shrinks from d64 to d128" in text
    assert "it grows from d64 to d128" in text
    assert "- single, EA's gain" not in text  # one size: no trend to state
