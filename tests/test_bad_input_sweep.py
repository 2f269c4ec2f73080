"""Bad input, as users meet it, over the recipes and the CLI: one row per case,
readable as a table

    input  ->  the message the user sees  ->  nothing left behind

Each row runs the real command on real-format input (a cut-down Multi30k copy from
../shared/data, checkpoints of a tiny model trained by scripts/train.sh), checks
that it fails, that stderr holds every expected fragment (the file, line, flag or
checkpoint, and the remedy), and that the listed paths do not exist afterwards (no
half-written output looking complete) or are unchanged. A few rows are inputs that
work, with a warning: they check that the command succeeds and that its output
(stdout and stderr: fairseq logs to stdout) holds the fragments."""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
from conftest import BIN
from helpers import REPO, USER_DIR
from recipe_fixtures import SHARED, edit_gz_line, make_multi30k_dir

SCRIPTS = Path(REPO) / "scripts"
pytestmark = pytest.mark.shared_data("multi30k")
TINY_MODEL = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 "
              "--encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 "
              "--decoder-attention-heads 2")


@dataclass
class Case:
    """One row: `setup(ws)` prepares the workspace and returns the command, its
    environment and the paths that must not exist afterwards."""
    name: str
    setup: Callable[["Workspace"], "Run"]
    expect: Sequence[str]  # fragments of stderr; "{ws}" is the workspace folder
    succeeds: bool = False  # True: the input works, with a warning (fragments of stdout + stderr)
    not_expect: Sequence[str] = ()  # fragments that must not be there


@dataclass
class Run:
    cmd: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    absent: List[Path] = field(default_factory=list)  # must not exist afterwards
    unchanged: List[Path] = field(default_factory=list)  # files/folders whose content must not change
    input: Optional[str] = None  # the command's stdin


@dataclass
class Workspace:
    root: Path
    trained: Path  # a save dir with checkpoint1.pt, checkpoint2.pt, checkpoint_last.pt (EA)
    data_bin: Path  # a prepared Multi30k data-bin


def _env(**extra) -> Dict[str, str]:
    env = dict(os.environ)
    env["EA_PYTHON"] = sys.executable
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _bash(script: str, *args) -> List[str]:
    return ["bash", str(SCRIPTS / script), *map(str, args)]


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _multi30k(ws: Workspace, **env) -> Run:
    """prepare-multi30k.sh on ws/m30k, into ws/data-bin (BPE small, one worker)."""
    dest = ws.root / "data-bin"
    return Run(_bash("prepare-multi30k.sh"),
               dict(MULTI30K_DIR=ws.root / "m30k", WORK=ws.root / "work", DEST=dest, BPE_TOKENS=300, WORKERS=1,
                    **env), absent=[dest])


# ----------------------------------------------------------------------------- the rows

def bad_utf8(ws):
    edit_gz_line(ws.root / "m30k" / "train.de.gz", 1234, b"Ein Hund \xff\xfe rennt")
    return _multi30k(ws)


def unequal_lines(ws):
    p = ws.root / "m30k" / "val.en.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"one line too many\n"))
    return _multi30k(ws)


def empty_file(ws):
    (ws.root / "m30k" / "test_2016_flickr.de.gz").write_bytes(gzip.compress(b""))
    return _multi30k(ws)


def missing_from_local_copy(ws):
    (ws.root / "m30k" / "val.en.gz").unlink()
    run = _multi30k(ws)  # OFFLINE not set: still, nothing may be downloaded into the user's folder
    run.unchanged.append(ws.root / "m30k")
    run.absent.append(ws.root / "work")
    return run


def missing_local_tgz(ws):
    tgz = ws.root / "mine" / "de-en.tgz"
    return Run(_bash("prepare-iwslt14.sh"), dict(IWSLT14_TGZ=tgz, WORK=ws.root / "w", DEST=ws.root / "bin"),
               absent=[tgz, ws.root / "bin"])


def train_lines_not_a_number(ws):
    return _multi30k(ws, TRAIN_LINES="abc")


def train_lines_negative(ws):
    return _multi30k(ws, TRAIN_LINES="-5")


def unknown_bpe(ws):
    return _multi30k(ws, BPE="wordpiece")


def num_avg_not_a_number(ws):
    save = ws.root / "ckpt"
    shutil.copytree(ws.trained, save)
    return Run(_bash("evaluate.sh", "multi30k"), dict(NUM_AVG="abc", DATA_BIN=ws.data_bin, SAVE_DIR=save),
               absent=[save / "eval"])


def mistyped_save_dir(ws):
    typo = ws.root / "chekpoints"
    return Run(_bash("evaluate.sh", "multi30k"), dict(NUM_AVG=2, DATA_BIN=ws.data_bin, SAVE_DIR=typo),
               absent=[typo])


def truncated_checkpoint_among_averaged(ws):
    save = ws.root / "ckpt"
    shutil.copytree(ws.trained, save)
    data = (save / "checkpoint1.pt").read_bytes()
    (save / "checkpoint1.pt").write_bytes(data[: len(data) // 3])
    return Run(_bash("evaluate.sh", "multi30k"), dict(NUM_AVG=2, DATA_BIN=ws.data_bin, SAVE_DIR=save),
               absent=[save / "eval" / "checkpoint.avg2.pt", save / "eval" / "checkpoint.avg2.pt.tmp",
                       save / "eval" / "test.json"])


def empty_checkpoint_last(ws):
    save = ws.root / "ckpt"
    shutil.copytree(ws.trained, save)
    (save / "checkpoint_last.pt").write_bytes(b"")
    run = Run(_bash("train.sh", "multi30k"), dict(DATA_BIN=ws.data_bin, SAVE_DIR=save, MAX_EPOCH=3,
                                                   EXTRA_ARGS=TINY_MODEL))
    run.unchanged += [save / "checkpoint1.pt", save / "checkpoint2.pt"]
    run.absent.append(save / "checkpoint3.pt")
    return run


def ea_checkpoint_without_user_dir(ws):
    return Run([str(BIN / "fairseq-generate"), str(ws.data_bin), "--path", str(ws.trained / "checkpoint_last.pt"),
                "--cpu", "--max-sentences", "8"], {})


def bad_ea_flag(ws):
    save = ws.root / "ckpt"
    return Run(_bash("train.sh", "multi30k"), dict(DATA_BIN=ws.data_bin, SAVE_DIR=save, MAX_EPOCH=1,
                                                   EXTRA_ARGS=TINY_MODEL + " --ea-alpha 1.5"),
               absent=[save / "checkpoint_last.pt", save / "checkpoint1.pt"])


def unknown_model(ws):
    return Run(_bash("train.sh", "multi30k"), dict(MODEL="ea2", SAVE_DIR=ws.root / "x"), absent=[ws.root / "x"])


def unknown_benchmark(ws):
    return Run(_bash("evaluate.sh", "iwslt15"), {})


def _fairseq_train(ws, *extra: str, env=None) -> Run:
    """fairseq-train on the prepared data: the tiny EA model, one update."""
    save = ws.root / "ckpt"
    cmd = [str(BIN / "fairseq-train"), str(ws.data_bin), "--user-dir", USER_DIR, "--arch", "ea_transformer",
           *TINY_MODEL.split(), "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1000",
           "--max-update", "1", "--save-dir", str(save), *extra]
    return Run(cmd, env or {}, absent=[save])


def fp16_on_the_cpu(ws):
    return _fairseq_train(ws, "--cpu", "--fp16")


def bf16_without_a_gpu(ws):
    return _fairseq_train(ws, "--bf16", env={"CUDA_VISIBLE_DEVICES": ""})


def one_layer_encoder_with_ea(ws):
    run = _fairseq_train(ws, "--cpu", "--decoder-layers", "2", "--no-save")
    run.absent = []
    return run


def _interactive(ws, text: str) -> Run:
    return Run([str(BIN / "fairseq-interactive"), str(ws.data_bin), "--user-dir", USER_DIR,
                "--path", str(ws.trained / "checkpoint_last.pt"), "--source-lang", "de", "--target-lang", "en",
                "--beam", "2", "--max-len-b", "10", "--cpu"], input=text)


def empty_line_to_interactive(ws):
    return _interactive(ws, "ein hund läuft .\n\nzwei männer .\n")


def long_line_to_interactive(ws):
    return _interactive(ws, " ".join(["hund"] * 2000) + "\n")


SWEEP = [
    # input                                     -> message (fragments)                                -> nothing left
    Case("invalid UTF-8, train.de.gz line 1234", bad_utf8,
         ["m30k/train.de.gz: line 1234: invalid UTF-8", "byte 10", "iconv"]),
    Case("unequal line counts (val)", unequal_lines, ["line counts differ", "m30k/val.de.gz has 60 lines", "m30k/val.en.gz has 61"]),
    Case("an empty corpus file", empty_file, ["test_2016_flickr.de.gz: no text in it"]),
    Case("a file missing from MULTI30K_DIR, online", missing_from_local_copy,
         ["MULTI30K_DIR=", "val.en.gz is missing or empty", "leave MULTI30K_DIR unset to download"]),
    Case("a missing IWSLT14_TGZ, online", missing_local_tgz,
         ["IWSLT14_TGZ=", "de-en.tgz: no such file", "leave IWSLT14_TGZ unset"]),
    Case("TRAIN_LINES=abc", train_lines_not_a_number, ["TRAIN_LINES=abc: expected a whole number >= 0"]),
    Case("TRAIN_LINES=-5", train_lines_negative, ["TRAIN_LINES=-5: expected a whole number >= 0"]),
    Case("BPE=wordpiece", unknown_bpe, ["BPE=wordpiece: expected subword-nmt or sentencepiece"]),
    Case("NUM_AVG=abc", num_avg_not_a_number, ["NUM_AVG=abc: expected a whole number >= 1"]),
    Case("a mistyped SAVE_DIR", mistyped_save_dir, ["SAVE_DIR=", "chekpoints: no such folder", "train.sh multi30k"]),
    Case("a truncated checkpoint among those averaged", truncated_checkpoint_among_averaged,
         ["cannot read checkpoint", "checkpoint1.pt", "truncated", "could not average the last 2 checkpoints"]),
    Case("a 0-byte checkpoint_last.pt at resume", empty_checkpoint_last,
         ["cannot read checkpoint", "checkpoint_last.pt (0 bytes; EOFError", "--restore-file",
          "checkpoint1.pt, checkpoint2.pt"]),
    Case("an EA checkpoint without --user-dir", ea_checkpoint_without_user_dir,
         ["unknown model 'ea_transformer'", "--user-dir ea_fairseq"]),
    Case("--ea-alpha 1.5", bad_ea_flag, ["--ea-alpha must be a number in [0, 1], got 1.5"]),
    Case("MODEL=ea2", unknown_model, ["MODEL=ea2: expected ea or vanilla"]),
    Case("an unknown benchmark", unknown_benchmark, ["usage: evaluate.sh"]),
    Case("fairseq-train --fp16 --cpu", fp16_on_the_cpu,
         ["--fp16 trains in half precision on a GPU, and --cpu is set", "Leave out --fp16", "or train on a GPU"]),
    Case("fairseq-train --bf16, no GPU visible", bf16_without_a_gpu,
         ["--bf16 trains in half precision on a GPU, and no CUDA GPU is visible", "Leave out --bf16"]),
    Case("--encoder-layers 1 with encoder EA (works, warns)", one_layer_encoder_with_ea,
         ["--encoder-layers 1 with evolving encoder self-attention: EA needs at least two layers in a stack "
          "to act", "nothing evolves there", "add --ea-no-encoder-self-attn", "done training"],
         succeeds=True, not_expect=["--decoder-layers 1 with"]),
    Case("an empty line to fairseq-interactive (works, warns)", empty_line_to_interactive,
         ["input line 2 is empty: nothing to translate, its output (id 1) is an empty hypothesis",
          "S-1\t\n", "H-1\t0.0\t\n", "H-2\t"], succeeds=True),
    Case("a 2,000-token line to fairseq-interactive", long_line_to_interactive,
         ["Size of sample #0 is invalid", "max_positions=(1024, 1024)", "--skip-invalid-size-inputs-valid-test"]),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared Multi30k cut (300 pairs) and a tiny EA model trained two epochs on it
    with scripts/train.sh: checkpoint1.pt, checkpoint2.pt, checkpoint_last.pt."""
    root = tmp_path_factory.mktemp("sweep_base")
    m30k = make_multi30k_dir(root / "m30k")
    data_bin = root / "data-bin"
    for cmd, env in (
        (_bash("prepare-multi30k.sh"), dict(MULTI30K_DIR=m30k, WORK=root / "work", DEST=data_bin, BPE_TOKENS=300,
                                            WORKERS=1)),
        (_bash("train.sh", "multi30k"), dict(DATA_BIN=data_bin, SAVE_DIR=root / "ckpt", MAX_EPOCH=2,
                                             EXTRA_ARGS=TINY_MODEL, LOG_INTERVAL=1)),
    ):
        proc = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "ckpt", data_bin


@pytest.mark.parametrize("case", SWEEP, ids=[c.name for c in SWEEP])
def test_bad_input(case, trained, tmp_path):
    ws = Workspace(tmp_path, *trained)
    make_multi30k_dir(tmp_path / "m30k", n_train=1300)
    run = case.setup(ws)
    before = {p: _fingerprint(p) for p in run.unchanged}
    proc = subprocess.run(run.cmd, env=_env(**run.env), cwd=tmp_path, input=run.input, capture_output=True,
                          text=True, timeout=600)
    if case.succeeds:
        assert proc.returncode == 0, f"{case.name}: it failed\n{proc.stderr[-3000:]}"
        shown = proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0, f"{case.name}: it did not fail\n{proc.stderr[-3000:]}"
        shown = proc.stderr
    for fragment in case.expect:
        assert fragment.format(ws=tmp_path) in shown, f"{case.name}: no {fragment!r} in\n{shown[-3000:]}"
    for fragment in case.not_expect:
        assert fragment not in shown, f"{case.name}: {fragment!r} in\n{shown[-3000:]}"
    assert "Traceback" not in proc.stderr or case.name in _TRACEBACK_OK, proc.stderr[-3000:]
    for p in run.absent:
        assert not p.exists(), f"{case.name}: left {p}"
        assert not list(p.parent.glob(p.name + ".tmp*")), f"{case.name}: left {p}.tmp*"
    for p, fp in before.items():
        assert _fingerprint(p) == fp, f"{case.name}: changed {p}"


# fairseq's own commands print a Python traceback above the message (fairseq's way of
# failing); the recipes and scripts print the message alone.
_TRACEBACK_OK = {"a 0-byte checkpoint_last.pt at resume", "an EA checkpoint without --user-dir", "--ea-alpha 1.5",
                 "fairseq-train --fp16 --cpu", "fairseq-train --bf16, no GPU visible",
                 "a 2,000-token line to fairseq-interactive"}

