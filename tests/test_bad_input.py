"""Invalid --ea-* options fail when the model is built, naming the flag."""

import subprocess
import sys

import pytest
from helpers import TINY, USER_DIR, DummyTask, make_dictionary, parse_model_args

from ea_fairseq.models import EATransformerModel


def _build(extra):
    args = parse_model_args("ea_transformer", list(TINY) + list(extra))
    return EATransformerModel.build_model(args, DummyTask(make_dictionary()))


@pytest.mark.parametrize("extra,flag", [
    (["--ea-alpha", "1.5"], "--ea-alpha"),
    (["--ea-alpha", "-0.1"], "--ea-alpha"),
    (["--ea-beta", "2"], "--ea-beta"),
    (["--ea-beta", "-1"], "--ea-beta"),
    (["--ea-kernel-size", "4"], "--ea-kernel-size"),
    (["--ea-kernel-size", "0"], "--ea-kernel-size"),
    (["--ea-kernel-size", "-3"], "--ea-kernel-size"),
])
def test_out_of_range_values_fail_at_build_time(extra, flag):
    with pytest.raises(ValueError, match=flag):
        _build(extra)


def test_unknown_activation_fails_at_build_time():
    # argparse refuses it on the command line (below); a namespace from elsewhere
    # (an edited checkpoint, Python code) is refused when the model is built
    args = parse_model_args("ea_transformer", TINY)
    args.ea_activation = "swish"
    with pytest.raises(ValueError, match="--ea-activation"):
        EATransformerModel.build_model(args, DummyTask(make_dictionary()))


def test_unknown_activation_fails_on_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", "unused-data", "--user-dir", USER_DIR,
         "--arch", "ea_transformer", "--ea-activation", "swish"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "--ea-activation" in proc.stderr and "invalid choice" in proc.stderr


def test_valid_edge_values_build():
    for extra in (["--ea-alpha", "0", "--ea-beta", "1"], ["--ea-alpha", "1", "--ea-beta", "0"],
                  ["--ea-kernel-size", "1"], ["--ea-kernel-size", "7"]):
        _build(extra)


def test_cross_self_attention_with_decoder_ea_is_refused():
    with pytest.raises(ValueError, match="--cross-self-attention"):
        _build(["--cross-self-attention"])
    _build(["--cross-self-attention", "--ea-no-decoder-self-attn"])
