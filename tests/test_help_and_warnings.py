"""`--help` lists the model's options, and fairseq's commands run without
deprecation warnings on this stack (both fixed in fairseq by scripts/fairseq_patches.py)."""

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import fairseq
import pytest
from conftest import fairseq_cmd, run
from helpers import REPO

from ea_fairseq.models.ea_config import EvolvingAttentionConfig

TINY_ARGS = [
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]
# a warning as Python prints it: "path:line: SomeWarning: message"
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: .*$", re.M)


def _help(*args: str) -> str:
    proc = run([fairseq_cmd("fairseq-train"), *args, "--help"], cwd=REPO)
    return proc.stdout


def test_help_lists_ea_options_with_their_help():
    text = _help("--user-dir", "ea_fairseq", "--arch", "ea_transformer_iwslt_de_en")
    flat = " ".join(text.split())  # argparse wraps help text
    for f in fields(EvolvingAttentionConfig):
        if f.name.startswith("_"):
            continue  # FairseqDataclass's _name
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, f"{flag} missing from --help"
        words = " ".join(f.metadata["help"].split()[:6])
        assert words in flat, f"help text of {flag} missing: {words!r}"
    assert "(default: 0.5)" in flat and "--ea-activation {linear,relu,leaky_relu,gelu,tanh}" in flat
    assert "--ea-attn-impl {eager,fused}" in flat and "the memory-saving fast path (same results) (default: fused)" in flat
    # fairseq's own model, task and criterion options are there too
    for flag in ("--encoder-layers", "--share-decoder-input-output-embed", "--source-lang"):
        assert flag in text


def test_help_lists_options_of_fairseq_archs_and_criterion():
    text = _help("--arch", "transformer_wmt_en_de", "--criterion", "label_smoothed_cross_entropy",
                 "--optimizer", "adam")
    for flag in ("--encoder-layers", "--decoder-attention-heads", "--label-smoothing", "--adam-betas"):
        assert flag in text
    assert "--ea-alpha" not in text  # no --user-dir: the plugin is not loaded


def test_help_without_arch_still_works():
    text = _help()
    assert "--arch ARCH" in text and "--encoder-layers" not in text


@pytest.mark.parametrize("arch", ["ea_transformer", "transformer"])
def test_train_and_generate_print_no_warnings(arch, reversal_data, tmp_path):
    """Every warning shown (PYTHONWARNINGS=always shows even DeprecationWarnings,
    and each one each time): the vanilla transformer takes fairseq's fused attention
    path (where torch deprecated mixed mask types), EA its own."""
    _, bin_dir = reversal_data
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    train = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", "--arch", arch, *TINY_ARGS,
                 "--optimizer", "adam", "--lr", "1e-3", "--criterion", "label_smoothed_cross_entropy",
                 "--max-tokens", "500", "--max-update", "3", "--cpu", "--save-dir", tmp_path,
                 "--no-epoch-checkpoints"], cwd=REPO, env=env)
    gen = run([fairseq_cmd("fairseq-generate"), bin_dir, "--user-dir", "ea_fairseq",
               "--path", tmp_path / "checkpoint_last.pt", "--beam", "2", "--batch-size", "50", "--cpu",
               "--max-len-a", "0", "--max-len-b", "8"], cwd=REPO, env=env)
    log = train.stdout + train.stderr + gen.stdout + gen.stderr
    assert "num_updates 3" in log or "num_updates=3" in log or "done training" in log
    assert WARNING_LINE.findall(log) == []


def test_warning_detector_sees_torch_deprecations():
    """Control for the test above: torch still warns about the calls fairseq made,
    and the pattern catches it."""
    proc = subprocess.run([sys.executable, "-W", "always", "-c",
                           "import torch\nwith torch.cuda.amp.autocast(enabled=False): pass"],
                          capture_output=True, text=True, check=True)
    assert WARNING_LINE.findall(proc.stderr)


def test_installed_fairseq_has_no_deprecated_torch_calls():
    root = Path(fairseq.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "examples" in path.relative_to(root).parts:
            continue  # not imported by fairseq's commands
        text = path.read_text(encoding="utf-8")
        for pattern in ("torch.cuda.amp.autocast(", "@torch.jit.script"):
            if pattern in text:
                offenders.append(f"{path.relative_to(root)}: {pattern}")
    assert offenders == []
