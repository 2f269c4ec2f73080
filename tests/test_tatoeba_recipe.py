"""scripts/prepare-tatoeba.sh (and scripts/prepare-parallel.sh behind it) on the real
Tatoeba De-En files of ../shared/data and on slices of them: the splits, cased text,
the sacreBLEU reference as given, idempotence, and bad input (invalid UTF-8 naming the
file and line, unequal line counts, empty and missing files, a missing folder), with
nothing left behind that looks prepared. With CI=true, missing shared data fails."""

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN
from helpers import REPO
from recipe_fixtures import SHARED, edit_gz_line

SCRIPTS = Path(REPO) / "scripts"
FILES = [f"{split}.{lang}.gz" for split in ("train", "valid", "test") for lang in ("de", "en")]


def need_shared(*parts: str) -> Path:
    """A folder of ../shared/data; skipped without it, except under CI=true, where the
    data must be there (a CI run that skipped it would claim what it did not test)."""
    path = SHARED.joinpath(*parts)
    if not path.is_dir():
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"no shared data at {path} (CI=true: ../shared/data must be beside the checkout)")
        pytest.skip(f"no shared data at {path}")
    return path


def slice_tatoeba(dest: Path, n_train: int = 300, n_eval: int = 30) -> Path:
    """The first lines of the real Tatoeba files, gzipped as released."""
    src = need_shared("tatoeba-de-en")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        n = n_train if name.startswith("train") else n_eval
        with gzip.open(src / name, "rb") as f:
            data = b"".join(line for _, line in zip(range(n), f))
        (dest / name).write_bytes(gzip.compress(data))
    return dest


def env(**extra) -> dict:
    e = dict(os.environ)
    e["EA_PYTHON"] = sys.executable
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def prepare(script: str = "prepare-tatoeba.sh", expect_ok: bool = True, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPTS / script)], env=env(**extra), capture_output=True, text=True,
                          timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def lines(path: Path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def gz_lines(path: Path):
    return gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")[:-1]


def test_real_files_first_training_lines(tmp_path):
    """TRAIN_LINES=300 of the real files: the first 300 training pairs, the whole valid
    (2,000) and test (3,001) sets, Moses tokens with case kept, a joint BPE of the
    size asked, the raw test text as the sacreBLEU reference, byte for byte."""
    real = need_shared("tatoeba-de-en")
    dest, work = tmp_path / "bin", tmp_path / "work"
    prepare(TATOEBA_DIR=real, TRAIN_LINES=300, BPE_TOKENS=300, WORKERS=1, WORK=work, DEST=dest)
    prepared = (dest / "PREPARED").read_text()
    assert "settings=bpe=subword-nmt bpe_tokens=300 train_lines=300 cased" in prepared
    assert "reference=test.raw.en: test.en.gz as given (cased, untokenised)" in prepared
    assert len(lines(work / "train.en")) == len(lines(work / "train.de")) == 300
    assert len(lines(work / "valid.de")) == 2000 and len(lines(work / "test.en")) == 3001
    assert lines(dest / "test.raw.en") == gz_lines(real / "test.en.gz")
    assert lines(dest / "test.raw.de") == gz_lines(real / "test.de.gz")
    raw, tok = lines(dest / "test.raw.en"), lines(dest / "test.tok.en")
    assert raw[0] == "Alkalis neutralize acids." and tok[0] == "Alkalis neutralize acids ."  # cased, tokenised
    assert sum(t != t.lower() for t in tok) > 2500  # not lowercased
    assert len(lines(dest / "bpe.code")) == 301  # header + 300 merges
    for split in ("train", "valid", "test"):
        assert (dest / f"{split}.de-en.de.bin").is_file() and (dest / f"{split}.de-en.en.idx").is_file()
    assert str(real / "train.de.gz") in (dest / "INPUTS.json").read_text()


@pytest.fixture(scope="module")
def prepared_slice(tmp_path_factory):
    root = tmp_path_factory.mktemp("tatoeba")
    tat = slice_tatoeba(root / "tatoeba")
    settings = dict(TATOEBA_DIR=tat, BPE_TOKENS=200, WORKERS=1, WORK=root / "work", DEST=root / "bin")
    prepare(**settings)
    return root, settings


def test_second_run_is_skipped_and_other_inputs_are_refused(prepared_slice, tmp_path):
    root, settings = prepared_slice
    stamp = (root / "bin" / "PREPARED").stat().st_mtime_ns
    assert "already prepared" in prepare(**settings).stderr
    other = slice_tatoeba(tmp_path / "other", n_train=250)
    proc = prepare(expect_ok=False, **{**settings, "TATOEBA_DIR": other})
    assert proc.returncode != 0 and "was prepared from other inputs" in proc.stderr and "FORCE=1" in proc.stderr
    assert (root / "bin" / "PREPARED").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------ bad input

def _bad_utf8(tat):
    edit_gz_line(tat / "train.en.gz", 123, b"Tom \xe4 Mary")
    return ["tatoeba/train.en.gz: line 123: invalid UTF-8", "byte 5", "iconv"]


def _unequal(tat):
    p = tat / "valid.de.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"Eine Zeile zu viel.\n"))
    return ["line counts differ", "tatoeba/valid.de.gz has 31 lines", "tatoeba/valid.en.gz has 30"]


def _empty(tat):
    (tat / "test.en.gz").write_bytes(gzip.compress(b""))
    return ["tatoeba/test.en.gz: no text in it"]


def _missing(tat):
    (tat / "test.de.gz").unlink()
    return ["TATOEBA_DIR=", "test.de.gz is missing or empty", "{train,valid,test}.{de,en}.gz",
            "../shared/data/tatoeba-de-en"]


def _no_folder(tat):
    shutil.rmtree(tat)
    return ["TATOEBA_DIR=", "tatoeba: no such folder"]


def _not_gzip(tat):
    (tat / "valid.en.gz").write_text("plain text, not gzip\n")
    return ["could not read", "tatoeba/valid.en.gz"]


@pytest.mark.parametrize("case", [_bad_utf8, _unequal, _empty, _missing, _no_folder, _not_gzip],
                         ids=lambda c: c.__name__.strip("_"))
def test_bad_input_fails_naming_the_file(case, tmp_path):
    tat = slice_tatoeba(tmp_path / "tatoeba")
    expect = case(tat)
    dest = tmp_path / "bin"
    proc = prepare(expect_ok=False, TATOEBA_DIR=tat, BPE_TOKENS=200, WORKERS=1, WORK=tmp_path / "work", DEST=dest)
    assert proc.returncode != 0
    for fragment in expect:
        assert fragment in proc.stderr, (fragment, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert not dest.exists() and not list(tmp_path.glob("bin.tmp*"))


def test_whitespace_only_lines_dropped_from_training_kept_in_test(tmp_path):
    tat = slice_tatoeba(tmp_path / "tatoeba")
    edit_gz_line(tat / "train.de.gz", 7, b"   ")
    edit_gz_line(tat / "test.en.gz", 4, b" ")
    proc = prepare(TATOEBA_DIR=tat, BPE_TOKENS=200, WORKERS=1, WORK=tmp_path / "work", DEST=tmp_path / "bin")
    assert "train.{de,en}.gz: dropped 1 of 300 training pairs with a whitespace-only side (lines 7)" in proc.stderr
    assert "test.en.gz: 1 whitespace-only line(s) in the test set (lines 4)" in proc.stderr
    assert len(lines(tmp_path / "work" / "train.en")) == 299
    assert len(lines(tmp_path / "bin" / "test.raw.en")) == 30 and lines(tmp_path / "bin" / "test.raw.en")[3] == " "


def test_variables_are_checked_before_any_work(tmp_path):
    tat = slice_tatoeba(tmp_path / "tatoeba")
    for var, value, message in (("TRAIN_LINES", "many", "TRAIN_LINES=many: expected a whole number >= 0"),
                                ("BPE_TOKENS", "0", "BPE_TOKENS=0: expected a whole number >= 1"),
                                ("BPE", "wordpiece", "BPE=wordpiece: expected subword-nmt or sentencepiece")):
        proc = prepare(expect_ok=False, TATOEBA_DIR=tat, WORK=tmp_path / "work", DEST=tmp_path / "bin", **{var: value})
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "work").exists() and not (tmp_path / "bin").exists()


# ------------------------------------------------------------- the general recipe

def test_general_recipe_plain_text_other_names_and_lowercasing(tmp_path):
    """prepare-parallel.sh on plain-text files with other split names: LOWERCASE=1
    lowercases the tokens and the sacreBLEU reference; the default keeps the case."""
    tat = slice_tatoeba(tmp_path / "gz", n_train=200, n_eval=20)
    plain = tmp_path / "plain"
    plain.mkdir()
    for split, stem in (("train", "tr"), ("valid", "dev"), ("test", "tst")):
        for lang in ("de", "en"):
            (plain / f"{stem}.{lang}").write_bytes(gzip.decompress((tat / f"{split}.{lang}.gz").read_bytes()))
    common = dict(CORPUS_DIR=plain, SPLITS="train=tr valid=dev test=tst", SUFFIX="", BPE_TOKENS=150, WORKERS=1,
                  NAME="mine.de-en")
    prepare("prepare-parallel.sh", WORK=tmp_path / "w1", DEST=tmp_path / "cased", **common)
    prepare("prepare-parallel.sh", WORK=tmp_path / "w2", DEST=tmp_path / "lower", LOWERCASE=1, **common)
    ref = gz_lines(tat / "test.en.gz")
    assert lines(tmp_path / "cased" / "test.raw.en") == ref
    assert lines(tmp_path / "lower" / "test.raw.en") == [r.lower() for r in ref] != ref
    assert "lowercase=1" in (tmp_path / "lower" / "PREPARED").read_text()
    assert "tst.en as given, untokenised, lowercased" in (tmp_path / "lower" / "PREPARED").read_text()
    assert all(t == t.lower() for t in lines(tmp_path / "w2" / "test.tok.en"))
    proc = prepare("prepare-parallel.sh", expect_ok=False, WORK=tmp_path / "w3", DEST=tmp_path / "x",
                   **{**common, "SPLITS": "train=tr valid=dev"})
    assert proc.returncode != 0 and "no test= file stem" in proc.stderr
    proc = prepare("prepare-parallel.sh", expect_ok=False, WORK=tmp_path / "w3", DEST=tmp_path / "x",
                   **{k: v for k, v in common.items() if k != "CORPUS_DIR"})
    assert proc.returncode != 0 and "CORPUS_DIR is not set" in proc.stderr
