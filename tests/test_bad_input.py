"""Invalid --ea-* options fail when the model is built, naming the flag; a one-layer
stack with EA on is built with a warning that nothing evolves there."""

import logging
import subprocess
import sys

import pytest
from helpers import TINY, USER_DIR, DummyTask, make_dictionary, parse_model_args

from ea_fairseq.models import EATransformerModel
from ea_fairseq.modules.evolving_attention import EvolvingMultiheadAttention


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


@pytest.mark.parametrize("name,flag", [("ea_activation", "--ea-activation"), ("ea_attn_impl", "--ea-attn-impl"),
                                       ("ea_conv_init", "--ea-conv-init")])
def test_unknown_choice_fails_at_build_time(name, flag):
    # argparse refuses it on the command line (below); a namespace from elsewhere
    # (an edited checkpoint, Python code) is refused when the model is built
    args = parse_model_args("ea_transformer", TINY)
    setattr(args, name, "swish")
    with pytest.raises(ValueError, match=f"{flag} must be one of .*, got 'swish' \\(hydra: model.{name}\\)"):
        EATransformerModel.build_model(args, DummyTask(make_dictionary()))


def test_attn_impl_reaches_every_module():
    for impl in ("eager", "fused"):
        model = _build(["--ea-cross-attn", "--ea-attn-impl", impl])
        specs = [m.ea for m in model.modules() if isinstance(m, EvolvingMultiheadAttention)]
        assert len(specs) == 9 and {s.impl for s in specs} == {impl}  # 3 stacks x 3 layers
    default = _build(["--ea-cross-attn"])
    assert {m.ea.impl for m in default.modules() if isinstance(m, EvolvingMultiheadAttention)} == {"fused"}


def test_invalid_attn_impl_fails_on_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", "unused-data", "--user-dir", USER_DIR,
         "--arch", "ea_transformer", "--ea-attn-impl", "fast"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "--ea-attn-impl: invalid choice: 'fast' (choose from eager, fused)" in proc.stderr.replace("'eager'", "eager").replace("'fused'", "fused")


@pytest.mark.parametrize("extra,warned", [
    (["--encoder-layers", "1"], ["--encoder-layers 1 with evolving encoder self-attention"]),
    (["--decoder-layers", "1", "--ea-cross-attn"], ["--decoder-layers 1 with evolving decoder self-attention",
                                                     "--decoder-layers 1 with evolving cross-attention"]),
    (["--encoder-layers", "1", "--ea-no-encoder-self-attn"], []),
    ([], []),
])
def test_one_layer_stack_with_ea_warns(extra, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="ea_fairseq"):
        _build(extra)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(":")[0] for m in messages] == warned
    for m in messages:
        assert "EA needs at least two layers in a stack to act" in m and "nothing evolves there" in m


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
