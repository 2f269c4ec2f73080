"""What the data recipes do with their inputs, beyond failing cleanly (the failures
are in test_bad_input_sweep.py): whitespace-only lines, interrupted binarisations,
changed inputs, and the sacreBLEU reference (the released text, unchanged)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN
from helpers import REPO
from recipe_fixtures import SHARED, edit_gz_line, make_multi30k_dir

SCRIPTS = Path(REPO) / "scripts"
sys.path.insert(0, str(SCRIPTS / "lib"))
import textprep  # noqa: E402

pytestmark = [pytest.mark.shared_data("multi30k"), pytest.mark.shared_data("wmt14")]


def _env(**extra):
    env = dict(os.environ)
    env["EA_PYTHON"] = sys.executable
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _settings(root: Path, m30k: Path, dest: Path = None):
    return dict(MULTI30K_DIR=m30k, WORK=root / "work", DEST=dest or root / "data-bin", BPE_TOKENS=300, WORKERS=1)


def prepare(expect_ok=True, **env):
    proc = subprocess.run(["bash", str(SCRIPTS / "prepare-multi30k.sh")], env=_env(**env), capture_output=True,
                          text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def _binarised_sizes(dest: Path, split: str):
    from fairseq.data import data_utils

    ds = data_utils.load_indexed_dataset(str(dest / f"{split}.de-en.en"), None)
    return [len(ds[i]) for i in range(len(ds))]


# ---------------------------------------------------------------- whitespace-only lines

def test_whitespace_only_lines_dropped_from_training_kept_in_test(tmp_path):
    m30k = make_multi30k_dir(tmp_path / "m30k")
    edit_gz_line(m30k / "train.de.gz", 5, b"  \t ")
    edit_gz_line(m30k / "train.en.gz", 9, b" ")
    edit_gz_line(m30k / "test_2016_flickr.en.gz", 7, b"   ")  # the empty T-6 reference
    proc = prepare(**_settings(tmp_path, m30k))
    assert "train.{de,en}.gz: dropped 2 of 300 training pairs with a whitespace-only side (lines 5, 9)" in proc.stderr
    assert "test_2016_flickr.en.gz: 1 whitespace-only line(s) in the test set (lines 7)" in proc.stderr
    dest, work = tmp_path / "data-bin", tmp_path / "work"
    train_de = _lines(work / "tmp" / "train.raw.de")
    assert len(train_de) == 298 and all(line.strip() for line in train_de)
    assert len(_binarised_sizes(dest, "train")) == 298
    # test: still 60 lines on both sides, aligned; the blank reference is line 7 (T-6)
    assert len(_lines(dest / "test.raw.en")) == len(_lines(dest / "test.raw.de")) == 60
    assert _lines(dest / "test.raw.en")[6].strip() == ""
    assert _lines(dest / "test.raw.de")[6] == _lines(work / "tmp" / "test.raw.de")[6].lower() != ""
    sizes = _binarised_sizes(dest, "test")
    assert len(sizes) == 60 and sizes[6] == 1  # EOS only


# ------------------------------------------------------------ interrupted binarisation

def _interruptible() -> None:
    """In the recipe's process, before exec: SIGINT delivered and at its default action,
    as in a terminal, whatever the test process inherited (a non-interactive shell's
    background job ignores SIGINT, and ignored signals cannot be trapped by bash)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_tmp(env, dest: Path):
    """Start the Multi30k recipe with a fairseq-preprocess that writes part of its output
    and then hangs, so that the interrupt lands during binarisation however fast the
    machine is; return once the temporary folder holds that partial output.

    The stand-in is a Python program, as fairseq-preprocess is: its SIGINT handler is in
    place before it writes, so an interrupt sent as soon as the output appears ends it."""
    shim = dest.parent / "stalling-bin"
    shim.mkdir(exist_ok=True)
    (shim / "fairseq-preprocess").write_text(
        f'#!{sys.executable}\n'
        'import os, sys, time\n'
        'd = sys.argv[sys.argv.index("--destdir") + 1]\n'
        'os.makedirs(d, exist_ok=True)\n'
        'open(os.path.join(d, "train.src-tgt.src.bin"), "w").write("partial")\n'
        'time.sleep(600)\n')
    (shim / "fairseq-preprocess").chmod(0o755)
    run_env = _env(**env)
    run_env["PATH"] = f"{shim}{os.pathsep}{run_env['PATH']}"
    proc = subprocess.Popen(["bash", str(SCRIPTS / "prepare-multi30k.sh")], env=run_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_interruptible)
    deadline = time.time() + 300
    while not list(dest.parent.glob(dest.name + ".tmp.*/*.bin")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def test_interrupted_binarisation_leaves_nothing_and_killed_leftovers_are_removed(tmp_path):
    m30k = make_multi30k_dir(tmp_path / "m30k")
    env = _settings(tmp_path, m30k)
    dest = tmp_path / "data-bin"
    # Ctrl-C (SIGINT to the process group): the recipe removes its half-written folder
    proc = _start_and_wait_for_tmp(env, dest)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the recipe did not stop on SIGINT; its stderr:\n{proc.communicate()[1][-3000:]}")
    assert proc.returncode != 0
    assert not dest.exists() and not list(tmp_path.glob("data-bin.tmp.*"))
    # SIGKILL cannot be caught: the folder stays ...
    proc = _start_and_wait_for_tmp(env, dest)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = list(tmp_path.glob("data-bin.tmp.*"))
    assert len(left) == 1 and not dest.exists()
    # ... and the next run removes it (its process is gone), and completes
    out = prepare(**env)
    assert f"removing {left[0]}, left by an interrupted run" in out.stderr
    assert not left[0].exists() and (dest / "PREPARED").is_file()


def test_a_running_binarisation_is_not_removed(tmp_path):
    live = tmp_path / "data-bin.tmp.{}".format(os.getpid())  # this process is alive
    live.mkdir()
    dead = tmp_path / "data-bin.tmp.999999999"
    dead.mkdir()
    proc = subprocess.run(["bash", "-c", 'source "$1"; remove_stale_tmp "$2"', "_", str(SCRIPTS / "lib" / "common.sh"),
                           str(tmp_path / "data-bin")], env=_env(), capture_output=True, text=True, check=True)
    assert live.is_dir() and not dead.exists()
    assert "still running" in proc.stderr


# --------------------------------------------------------------------- changed inputs

def test_changed_inputs_redo_the_steps_they_feed(tmp_path):
    a = make_multi30k_dir(tmp_path / "a")
    b = make_multi30k_dir(tmp_path / "b")
    edit_gz_line(b / "train.de.gz", 1, b"ein ganz anderer erster satz .")
    dest = tmp_path / "data-bin"
    prepare(**_settings(tmp_path, a))
    first = _lines(tmp_path / "work" / "tmp" / "train.raw.de")[0]
    # the same inputs: nothing to do
    assert "already prepared" in prepare(**_settings(tmp_path, a)).stderr
    # another MULTI30K_DIR while data-bin exists: refused, data-bin untouched
    stamp = (dest / "PREPARED").stat().st_mtime_ns
    proc = prepare(expect_ok=False, **_settings(tmp_path, b))
    assert proc.returncode != 0 and "was prepared from other inputs" in proc.stderr and "FORCE=1" in proc.stderr
    assert (dest / "PREPARED").stat().st_mtime_ns == stamp
    # ... and after deleting data-bin: every step redone from the new input
    shutil.rmtree(dest)
    proc = prepare(**_settings(tmp_path, b))
    assert "inputs changed since the last run" in proc.stderr and str(b) in proc.stderr
    assert _lines(tmp_path / "work" / "tmp" / "train.raw.de")[0] == "ein ganz anderer erster satz ." != first
    bpe = (tmp_path / "work" / "train.de").read_text(encoding="utf-8").split("\n")[0]
    assert bpe.replace("@@ ", "") == "ein ganz anderer erster satz ."  # BPE'd from the new text
    assert str(b / "train.de.gz") in (dest / "INPUTS.json").read_text()
    # an input edited in place (same path): redone too
    shutil.rmtree(dest)
    edit_gz_line(b / "train.de.gz", 1, b"noch ein anderer satz , viel laenger als der vorige .")
    proc = prepare(**_settings(tmp_path, b))
    assert "inputs changed since the last run" in proc.stderr and "train.de.gz changed" in proc.stderr
    assert _lines(tmp_path / "work" / "tmp" / "train.raw.de")[0].startswith("noch ein anderer satz")


# ------------------------------------------------------------------ sacreBLEU references

SGM = SHARED / "wmt14" / "newstest2014_sgm"


@pytest.mark.parametrize("name", sorted(p.name for p in SGM.glob("*.sgm")) if SGM.is_dir() else [])
def test_wmt_reference_is_the_released_text_as_sacrebleu_reads_it(name, tmp_path):
    """Byte for byte what sacreBLEU's own reader (`sacrebleu -t wmt14/full`) makes
    of the released SGML file; and the segments as released (no ’ -> ')."""
    from sacrebleu.dataset import DATASETS

    theirs = tmp_path / "sacrebleu.txt"
    DATASETS["wmt14/full"]._convert_format(str(SGM / name), str(theirs))
    ours = tmp_path / "ours.txt"
    subprocess.run([sys.executable, str(SCRIPTS / "lib" / "textprep.py"), "ref-segs"], stdin=open(SGM / name, "rb"),
                   stdout=open(ours, "wb"), check=True)
    assert ours.read_bytes() == theirs.read_bytes()
    released = [m.group(1) for m in re.finditer(r"^<seg [^>]*>(.*)</seg>", (SGM / name).read_text(encoding="utf-8"),
                                                re.M)]
    ref = _lines(ours)
    assert len(ref) == len(released) == 3003
    assert sum("\u2019" in r for r in released) == sum("\u2019" in r for r in ref)  # ’ kept
    if name.endswith(".de.sgm"):  # En-De's reference: the released segments, unchanged
        assert ref == released


@pytest.mark.shared_data("iwslt14", "orig_xml")
def test_iwslt_reference_decodes_xml_entities():
    xml = SHARED / "iwslt14" / "orig_xml" / "IWSLT14.TED.tst2010.de-en.en.xml"
    text = xml.read_text(encoding="utf-8")
    ref = list(textprep.ref_segs(text.splitlines(keepends=True)))
    assert "R&amp;D" in text and any("R&D" in r for r in ref) and not any("&amp;" in r for r in ref)
    assert len(ref) == text.count("<seg id")
    assert list(textprep.ref_segs(["<seg id=\"1\"> Tom &amp; Jerry &lt;3 &#8217; AT&T </seg>\n"])) == \
        ["Tom & Jerry <3 \u2019 AT&T"]
