"""scripts/prepare-wmt-small.sh on slices of the real files in ../shared/data/wmt_small:
splits, detokenised references, the WMT14 steps, and bad input."""

import os
import subprocess
from pathlib import Path

import pytest
from sacremoses import MosesDetokenizer

from conftest import run
from helpers import REPO
from recipe_fixtures import SHARED

pytestmark = pytest.mark.shared_data("wmt_small")

SCRIPT = f"{REPO}/scripts/prepare-wmt-small.sh"


def _slice(src: Path, dest: Path, n: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        with open(f, encoding="utf-8") as i, open(dest / f.name, "w", encoding="utf-8") as o:
            for k, line in enumerate(i):
                if k == n:
                    break
                o.write(line)


def _env(tmp_path, small, **extra):
    return {**os.environ, "WMT_SMALL_DIR": str(small), "WORK": str(tmp_path / "work"),
            "DEST": str(tmp_path / "bin"), "BPE_TOKENS": "400", "WORKERS": "1", **extra}


def _lines(p):
    return Path(p).read_text(encoding="utf-8").splitlines()


def test_fr_en_europarl_splits(tmp_path):
    small = tmp_path / "wmt_small"
    _slice(SHARED / "wmt_small" / "fr-en_europarl20k", small / "fr-en_europarl20k", 2600)
    run(["bash", SCRIPT, "fr-en"], env=_env(tmp_path, small))
    out = tmp_path / "bin"
    prepared = (out / "PREPARED").read_text()
    assert "source=fr" in prepared and "target=en" in prepared and "test=europarl" in prepared
    orig = _lines(small / "fr-en_europarl20k" / "europarl-v7.fr-en.en")
    raw, tok = _lines(out / "test.raw.en"), _lines(out / "test.tok.en")
    assert len(raw) == len(tok) == 1000
    # test = the last 1,000 lines, Moses-detokenised (&apos; -> ')
    detok = MosesDetokenizer(lang="en")
    assert raw == [detok.detokenize(line.split(), unescape=True) for line in orig[-1000:]]
    assert not any("&apos;" in line for line in raw) and any("'" in line for line in raw)
    assert any("&apos;" in line for line in tok)  # re-tokenised with Moses' escapes
    work = tmp_path / "work"
    assert len(_lines(work / "valid.fr")) == len(_lines(work / "valid.en")) == 1000
    n_train = len(_lines(work / "train.en"))
    assert 400 < n_train < 600  # the first 600, cleaned (ratio 1.5) after BPE
    assert (out / "train.fr-en.fr.bin").exists() and (out / "bpe.code").exists()
    # the same settings again: nothing to do
    again = run(["bash", SCRIPT, "fr-en"], env=_env(tmp_path, small))
    assert "already prepared" in again.stderr
    # TRAIN_LINES: the first N training lines; valid and test are unchanged
    sub = _env(tmp_path, small, TRAIN_LINES="200", WORK=str(tmp_path / "work200"), DEST=str(tmp_path / "bin200"))
    run(["bash", SCRIPT, "fr-en"], env=sub)
    assert "train_lines=200" in (tmp_path / "bin200" / "PREPARED").read_text()
    assert 150 < len(_lines(tmp_path / "work200" / "train.en")) <= 200
    assert _lines(tmp_path / "bin200" / "test.raw.en") == raw


def test_en_de_and_bad_input(tmp_path):
    small = tmp_path / "wmt_small"
    _slice(SHARED / "wmt_small" / "en-de_10k", small / "en-de_10k", 300)
    run(["bash", SCRIPT, "en-de"], env=_env(tmp_path, small))
    assert "source=en" in (tmp_path / "bin" / "PREPARED").read_text()
    assert len(_lines(tmp_path / "bin" / "test.raw.de")) == 300

    def fails(args, env, message):
        proc = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]

    fails(["de-fr"], _env(tmp_path, small), "usage: prepare-wmt-small.sh fr-en|en-de")
    fails(["fr-en"], _env(tmp_path, tmp_path / "nowhere"), "set WMT_SMALL_DIR")
    fails(["fr-en"], _env(tmp_path, small, TEST="wmt99"), "TEST=wmt99: expected europarl or newstest2012")
    fails(["en-de"], _env(tmp_path, small, TRAIN_LINES="100"), "TRAIN_LINES=100: only fr-en takes a subset")
    fails(["fr-en"], _env(tmp_path, small, TRAIN_LINES="x"), "TRAIN_LINES=x")
    # mismatched line counts: named, and no output left behind
    bad = tmp_path / "bad"
    _slice(SHARED / "wmt_small" / "en-de_10k", bad / "en-de_10k", 300)
    with open(bad / "en-de_10k" / "tgt-train.txt", "a", encoding="utf-8") as f:
        f.write("eine Zeile zu viel\n")
    env = {**_env(tmp_path, bad), "WORK": str(tmp_path / "work-bad"), "DEST": str(tmp_path / "bin-bad")}
    fails(["en-de"], env, "line counts differ")
    assert not (tmp_path / "bin-bad").exists()
