"""--optimizer ea_adam --ea-conv-no-weight-decay: the EA conv kernels, and only they,
escape weight decay; without the flag it is fairseq's Adam."""

import pytest
import torch
from fairseq import optim

from helpers import build_model, parse_model_args

OPT = ["--lr", "0.1", "--weight-decay", "0.1", "--adam-betas", "(0.9, 0.98)"]


def _optimizer(model, arch, extra):
    args = parse_model_args(arch, ["--optimizer", "ea_adam", *OPT, *extra])
    params = [p for p in model.parameters() if p.requires_grad]
    return optim.build_optimizer(args, params)


def _zero_grad_step(model, opt):
    """One Adam step with zero gradients: only the (decoupled) weight decay moves the
    parameters, p <- p * (1 - lr * wd)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return before


@pytest.mark.parametrize("exempt", [True, False])
def test_conv_kernels_escape_weight_decay_only_with_the_flag(exempt):
    model = build_model("ea_transformer", ["--ea-cross-attn"], dtype=torch.float32)
    opt = _optimizer(model, "ea_transformer", ["--ea-conv-no-weight-decay"] if exempt else [])
    kernels = {n for n, p in model.named_parameters() if n.endswith("conv.weight")}
    assert kernels, "the EA model should have conv kernels"
    before = _zero_grad_step(model, opt)
    for name, p in model.named_parameters():
        shrunk = torch.allclose(p.detach(), before[name] * (1 - 0.1 * 0.1), atol=1e-7)
        if name in kernels and exempt:
            assert torch.equal(p.detach(), before[name]), name
        elif before[name].abs().max() > 1e-3:  # (zero-initialised biases cannot show a shrink)
            assert shrunk, name
    groups = opt.optimizer.param_groups
    if exempt:
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        by_id = {id(p): n for n, p in model.named_parameters()}
        assert {by_id[id(p)] for p in groups[1]["params"]} == kernels
    else:
        assert len(groups) == 1


def test_flag_without_conv_kernels_fails_naming_the_flag():
    model = build_model("transformer", dtype=torch.float32)
    with pytest.raises(ValueError, match="--ea-conv-no-weight-decay: no conv kernel"):
        _optimizer(model, "transformer", ["--ea-conv-no-weight-decay"])


def test_later_optimizer_flag_wins_on_the_command_line():
    """benchmarks/quality.sh appends '--optimizer ea_adam ...' after train.sh's '--optimizer adam'."""
    args = parse_model_args("ea_transformer", ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
                                               "--optimizer", "ea_adam", "--ea-conv-no-weight-decay"])
    assert args.optimizer == "ea_adam" and args.ea_conv_no_weight_decay
    assert args.adam_betas == "(0.9, 0.98)"
