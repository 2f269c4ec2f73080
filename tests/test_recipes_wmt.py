"""The WMT14 recipes (scripts/prepare-wmt14en2{de,fr}.sh, train.sh and evaluate.sh with the
Scaling-NMT settings), offline on WMT-format archives built from ../shared/data."""

import json
import re
from pathlib import Path

import pytest
from recipe_fixtures import SHARED, make_wmt_cache
from test_recipes import SHORT, TINY_MODEL, bash, lines

pytestmark = pytest.mark.shared_data("wmt14")


def _prepare_wmt(root: Path, pair: str):
    tgt = pair.split("-")[1]
    cache = make_wmt_cache(root / "cache", pair)
    proc = bash(f"prepare-wmt14en2{tgt}.sh", CACHE=cache, OFFLINE=1, WORK=root / "work", DEST=root / "bin",
                BPE_TOKENS=1000, WORKERS=2)
    return root, proc


@pytest.fixture(scope="module")
def wmt_en_de(tmp_path_factory):
    return _prepare_wmt(tmp_path_factory.mktemp("wmt_en_de"), "en-de")


def test_wmt14_en_de_prepares_offline_from_cached_archives(wmt_en_de):
    _check_wmt(*wmt_en_de, "en-de", 3)


def test_wmt14_en_fr_prepares_offline_from_cached_archives(tmp_path):
    _check_wmt(*_prepare_wmt(tmp_path, "en-fr"), "en-fr", 5)


def _check_wmt(root, proc, pair, n_corpora):
    tgt = pair.split("-")[1]
    assert proc.stderr.count("normalising and tokenising") == 2 * n_corpora
    dest, work = root / "bin", root / "work"
    assert f"target={tgt}" in (dest / "PREPARED").read_text()
    assert len(lines(work / f"test.{tgt}")) == 3003  # newstest2014, full, not cleaned
    assert len(lines(work / f"valid.{tgt}")) == len(lines(work / "valid.en")) == 500  # newstest2013, not cleaned
    n_corpus = 3000 - 3000 % n_corpora  # make_wmt_cache's lines, shared out among the corpora
    assert 0.8 * n_corpus < len(lines(work / "train.en")) <= n_corpus  # cleaned after BPE
    # the raw references are the SGML texts; tokenisation splits hyphens aggressively (-a)
    assert lines(dest / f"test.raw.{tgt}")[0] == lines(work / f"test.raw.{tgt}")[0]
    assert "@-@" in (work / f"test.tok.{tgt}").read_text(encoding="utf-8")


def test_train_and_evaluate_wmt_en_de_recipe(wmt_en_de, tmp_path):
    """The Scaling-NMT recipe path (shared embeddings, update-freq, update checkpoints)
    and compound-split BLEU, on the En-De fixture."""
    data = wmt_en_de[0] / "bin"
    save = tmp_path / "ckpt"
    bash("train.sh", "wmt14_en_de", DATA_BIN=data, SAVE_DIR=save, MAX_UPDATE=2, UPDATE_FREQ=2, MAX_TOKENS=1024,
         EXTRA_ARGS=TINY_MODEL + " --save-interval-updates 1 --validate-interval-updates 1000")
    log = (save / "train.log").read_text()
    assert "ea_transformer_vaswani_wmt_en_de_big" in log and "'update_freq': [2]" in log
    proc = bash("evaluate.sh", "wmt14_en_de", DATA_BIN=data, SAVE_DIR=save, NUM_AVG=2, MAX_TOKENS=20000,
                GEN_ARGS=SHORT)
    result = json.loads((save / "eval" / "test.json").read_text())
    assert result["tokenized_bleu_compound_split"] is True and result["beam"] == "4" and result["lenpen"] == "0.6"
    assert result["sentences"] == 3003
    assert "compound-split" in proc.stdout
    # sacreBLEU scored against newstest2014's reference as released, and says so
    sgm = (SHARED / "wmt14" / "newstest2014_sgm" / "newstest2014-deen-ref.de.sgm").read_text(encoding="utf-8")
    released = re.findall(r"^<seg [^>]*>(.*)</seg>", sgm, re.M)
    assert lines(data / "test.raw.de") == released
    assert result["sacrebleu_reference"].startswith("test.raw.de: newstest2014 (full)")
    assert "as released" in result["sacrebleu_reference"]
