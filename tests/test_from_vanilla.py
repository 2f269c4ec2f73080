"""A fairseq Transformer checkpoint turned into EA: from_pretrained, --finetune-from-model,
--restore-file with the --reset-* flags; older EA checkpoints; mismatches named."""

import json
import re

import fairseq.modules.multihead_attention
import pytest
import torch
from conftest import fairseq_cmd, run
from fairseq.models.transformer import TransformerModel
from fairseq.modules.multihead_attention import MultiheadAttention
from helpers import REPO, build_model, make_dictionary, random_batch, softmax_keeping_float64

from ea_fairseq.models import EATransformerModel
from ea_fairseq.models.ea_checkpoint import EA_STATE_VERSION, EACheckpointMismatch
from ea_fairseq.modules import EvolvingMultiheadAttention

DIMS = [
    "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]
BT_COPIES = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
             "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
TRAIN = ["--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--dropout", "0",
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "2000",
         "--cpu", "--seed", "1", "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "10",
         "--validate-interval", "1000", "--disable-validation"]


def _train_losses(log: str):
    """The loss of every train_inner line of a --log-format json log."""
    losses = []
    for line in log.splitlines():
        m = re.search(r"\| train_inner \| (\{.*\})", line)
        if m:
            losses.append(float(json.loads(m.group(1))["loss"]))
    return losses


@pytest.fixture(scope="module")
def vanilla_ckpt(reversal_data, tmp_path_factory):
    """fairseq's own transformer, trained a little on the reversal task."""
    _, bin_dir = reversal_data
    save = tmp_path_factory.mktemp("vanilla")
    proc = run([fairseq_cmd("fairseq-train"), bin_dir, "--arch", "transformer", *DIMS, *TRAIN,
                "--max-update", "150", "--save-dir", save], cwd=REPO)
    losses = _train_losses(proc.stdout + proc.stderr)
    assert len(losses) >= 10, proc.stdout[-2000:]
    return bin_dir, save, losses


def _explicit_float64(model):
    for m in model.modules():
        if isinstance(m, MultiheadAttention):
            m.skip_embed_dim_check = True  # fairseq's explicit attention path, as the EA module's
    return model.double()


def test_from_pretrained_alpha_beta_zero_is_exactly_vanilla(vanilla_ckpt, monkeypatch):
    bin_dir, save, _ = vanilla_ckpt
    vanilla = TransformerModel.from_pretrained(str(save), "checkpoint_last.pt", str(bin_dir), bpe=None)
    ea = EATransformerModel.from_pretrained(str(save), "checkpoint_last.pt", str(bin_dir), bpe=None,
                                            ea_alpha=0.0, ea_beta=0.0, ea_cross_attn=True)
    model = ea.models[0]
    assert isinstance(model, EATransformerModel) and not model.training
    assert sum(isinstance(m, EvolvingMultiheadAttention) for m in model.modules()) == 3 * 2
    sentences = ["a b c d e f", "k j i", "b b a l"]
    assert ea.translate(sentences, beam=5) == vanilla.translate(sentences, beam=5)

    monkeypatch.setattr(fairseq.modules.multihead_attention.utils, "softmax", softmax_keeping_float64)
    v, e = _explicit_float64(vanilla.models[0]), _explicit_float64(model)
    d = vanilla.task.source_dictionary
    batch = random_batch(d, [7, 4, 9], [6, 9, 3], seed=5)
    keep = batch["prev_output_tokens"].ne(d.pad())
    with torch.no_grad():
        out_v = v(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])[0]
        out_e = e(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])[0]
    torch.testing.assert_close(out_e[keep], out_v[keep], rtol=0, atol=1e-12)


def test_from_pretrained_defaults_start_from_dirac_convs(vanilla_ckpt):
    bin_dir, save, _ = vanilla_ckpt
    vanilla = TransformerModel.from_pretrained(str(save), "checkpoint_last.pt", str(bin_dir), bpe=None)
    ea = EATransformerModel.from_pretrained(str(save), "checkpoint_last.pt", str(bin_dir), bpe=None)
    model = ea.models[0]
    convs = [m.ea_conv.conv for m in model.modules() if isinstance(m, EvolvingMultiheadAttention) and m.ea_conv]
    assert len(convs) == 2  # layer 2 of encoder and decoder self-attention
    for conv in convs:
        dirac = torch.zeros_like(conv.weight)
        torch.nn.init.dirac_(dirac)
        assert torch.equal(conv.weight, dirac) and not conv.bias.any()
    # every vanilla weight came across
    ea_params = dict(model.named_parameters())
    for k, t in vanilla.models[0].named_parameters():
        if k.rsplit(".", 1)[-1] in BT_COPIES and ".self_attn." not in k:
            continue  # fairseq's BetterTransformer copies: not kept by EA layers
        assert torch.equal(ea_params[k], t), k
    # EA (beta = 0.5) changes the function: the model is not secretly vanilla
    d = vanilla.task.source_dictionary
    batch = random_batch(d, [7, 4, 9], [6, 9, 3], seed=5)
    with torch.no_grad():
        args = (batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
        assert (model(*args)[0] - vanilla.models[0](*args)[0]).abs().max() > 1e-3


def test_finetune_from_vanilla_through_fairseq_train(vanilla_ckpt, tmp_path):
    bin_dir, save, vanilla_losses = vanilla_ckpt
    proc = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", "--arch", "ea_transformer",
                *DIMS, *TRAIN, "--max-update", "80", "--save-dir", tmp_path,
                "--finetune-from-model", save / "checkpoint_last.pt"], cwd=REPO)
    log = proc.stdout + proc.stderr
    assert "EA convolutions start at their initialisation" in log
    losses = _train_losses(log)
    assert len(losses) >= 7, log[-3000:]
    # starts from the vanilla model (far below the loss of an untrained model) ...
    assert losses[0] < vanilla_losses[0] - 1.0
    # ... and goes down
    assert losses[-1] < losses[0] - 0.1, losses
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["model"]["encoder.ea_version"].item() == EA_STATE_VERSION
    conv = state["model"]["encoder.layers.1.self_attn.ea_conv.conv.weight"]
    dirac = torch.zeros_like(conv)
    torch.nn.init.dirac_(dirac)
    assert not torch.equal(conv, dirac)  # the conv was trained


def test_restore_file_with_resets(vanilla_ckpt, tmp_path):
    bin_dir, save, _ = vanilla_ckpt
    proc = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", "--arch", "ea_transformer",
                *DIMS, *TRAIN, "--max-update", "10", "--save-dir", tmp_path,
                "--restore-file", save / "checkpoint_last.pt", "--reset-optimizer", "--reset-lr-scheduler",
                "--reset-dataloader", "--reset-meters"], cwd=REPO)
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "EA convolutions start at their initialisation" in log
    assert (tmp_path / "checkpoint_last.pt").exists()


def test_finetune_with_other_layer_count_names_the_flag(vanilla_ckpt, tmp_path):
    bin_dir, save, _ = vanilla_ckpt
    cmd = [fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", "--arch", "ea_transformer",
           *DIMS, "--decoder-layers", "3", *TRAIN, "--max-update", "10", "--save-dir", tmp_path,
           "--finetune-from-model", save / "checkpoint_last.pt"]
    with pytest.raises(AssertionError) as err:
        run(cmd, cwd=REPO)
    last = str(err.value).strip().splitlines()[-1]
    assert "the checkpoint has 2 decoder layers, this model 3" in last and "--decoder-layers 2" in last


# --- in-process: state dicts of every kind ---------------------------------------------------

def _load(model, state):
    return model.load_state_dict(state, strict=True)


def _ea(extra=(), d=None, seed=0):
    return build_model("ea_transformer", list(extra), dictionary=d, seed=seed)


def test_vanilla_state_with_bettertransformer_copies_loads():
    d = make_dictionary()
    vanilla = build_model("transformer", [], dictionary=d)
    state = vanilla.state_dict()
    assert "encoder.layers.0.in_proj_weight" in state  # fairseq's BT copies are in its checkpoints
    ea = _ea(d=d)
    _load(ea, state)
    assert "encoder.layers.0.in_proj_weight" not in ea.state_dict()
    assert torch.equal(ea.encoder.layers[0].self_attn.q_proj.weight, vanilla.encoder.layers[0].self_attn.q_proj.weight)


def test_older_ea_checkpoint_without_version_loads_and_is_upgraded():
    d = make_dictionary()
    old = _ea(["--ea-cross-attn", "--ea-conv-init", "kaiming"], d=d, seed=1)
    state = {k: v for k, v in old.state_dict().items() if not k.endswith("ea_version")}
    new = _ea(["--ea-cross-attn", "--ea-conv-init", "kaiming"], d=d, seed=2)
    _load(new, state)
    assert state["encoder.ea_version"].item() == EA_STATE_VERSION  # upgraded in place
    new_params = dict(new.named_parameters())
    for k, v in old.named_parameters():
        assert torch.equal(new_params[k], v), k


def test_newer_ea_checkpoint_fails():
    ea = _ea()
    state = ea.state_dict()
    state["decoder.ea_version"] = torch.tensor([float(EA_STATE_VERSION + 1)])
    with pytest.raises(EACheckpointMismatch, match="newer ea-fairseq"):
        _load(_ea(), state)


@pytest.mark.parametrize("saved, loaded, expected", [
    (["--ea-cross-attn"], [], r"convolutions that this model does not build, in encoder-decoder attention "
                              r"\(layers 2, 3; flags --ea-cross-attn, --ea-alpha\)"),
    ([], ["--ea-cross-attn"], r"builds evolving-attention convolutions that the checkpoint \(an EA checkpoint\) "
                              r"does not have, in encoder-decoder attention \(layers 2, 3; flags --ea-cross-attn"),
    (["--ea-no-encoder-self-attn"], [], r"does not have, in encoder self-attention .*--ea-no-encoder-self-attn"),
    (["--ea-alpha", "0"], [], r"does not have, in .*--ea-alpha"),
    (["--ea-kernel-size", "5"], [], r"differ in size \(encoder\.layers\.1\.self_attn\.ea_conv\.conv\.weight: "
                                    r"checkpoint \(4, 4, 5, 5\), model \(4, 4, 3, 3\).*--ea-kernel-size"),
    (["--encoder-layers", "2"], [], r"the checkpoint has 2 encoder layers, this model 3: .*--encoder-layers 2"),
    (["--encoder-embed-dim", "32", "--decoder-embed-dim", "32"], [],
     r"differ in size \(encoder\.embed_tokens\.weight: checkpoint \(\d+, 32\), model \(\d+, 16\).*"
     r"--encoder-embed-dim"),
])
def test_mismatching_checkpoints_name_the_flag(saved, loaded, expected):
    d = make_dictionary()
    state = _ea(saved, d=d).state_dict()
    with pytest.raises(EACheckpointMismatch, match=expected):
        _load(_ea(loaded, d=d), state)


def test_vanilla_with_other_layer_count_fails():
    d = make_dictionary()
    state = build_model("transformer", ["--decoder-layers", "4"], dictionary=d).state_dict()
    with pytest.raises(EACheckpointMismatch, match="4 decoder layers, this model 3"):
        _load(_ea(d=d), state)
