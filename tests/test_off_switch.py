"""With evolving attention switched off, ea_transformer is fairseq's transformer."""

import fairseq.modules.multihead_attention
import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from helpers import (
    TINY, build_model, full_logits, incremental_logits, make_dictionary, random_batch, softmax_keeping_float64,
)

OFF = ["--ea-no-encoder-self-attn", "--ea-no-decoder-self-attn"]
# EA modules in every stack, but alpha = beta = 0: no conv is built, no map is mixed in
ZERO = ["--ea-cross-attn", "--ea-alpha", "0", "--ea-beta", "0"]


def _vanilla_and_ea(ea_extra):
    d = make_dictionary()
    vanilla = build_model("transformer", [], dictionary=d, seed=3)
    ea = build_model("ea_transformer", ea_extra, dictionary=d, seed=4)
    # the EA model's only extra parameters are its convs (kept at their init)
    # (the EA model's upgrade_state_dict_named adds them to the state dict: strict works)
    ea.load_state_dict(vanilla.state_dict(), strict=True)
    return d, vanilla, ea


def _non_pad(batch, d):
    return batch["prev_output_tokens"].ne(d.pad())


def test_off_has_exactly_the_vanilla_parameters():
    d = make_dictionary()
    vanilla = build_model("transformer", [], dictionary=d)
    ea = build_model("ea_transformer", OFF, dictionary=d)
    bt = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
          "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    # fairseq 0.12.2 encoder layers carry unused BetterTransformer copies; EA layers do not
    want = {k for k in vanilla.state_dict() if k.rsplit(".", 1)[-1] not in bt or ".self_attn." in k}
    # plus the EA state-dict version of the encoder and decoder (a buffer)
    assert set(ea.state_dict()) == want | {"encoder.ea_version", "decoder.ea_version"}
    assert set(dict(ea.named_parameters())) == {k for k in want if k in dict(vanilla.named_parameters())}


def test_zero_alpha_beta_builds_no_conv():
    ea = build_model("ea_transformer", ZERO)
    assert not any("ea_conv" in n for n, _ in ea.named_parameters())
    ea = build_model("ea_transformer", ["--ea-cross-attn"])
    n_convs = sum(1 for n, _ in ea.named_parameters() if n.endswith("ea_conv.conv.weight"))
    assert n_convs == 3 * (3 - 1)  # three stacks, no conv in layer 1 of each


def _explicit_attention(model):
    """Make fairseq's MultiheadAttention skip its fused path (F.multi_head_attention_forward)
    and compute attention explicitly, like its incremental path does."""
    for m in model.modules():
        if isinstance(m, MultiheadAttention):
            m.skip_embed_dim_check = True  # the fused path is only taken without it
    return model


@pytest.mark.parametrize("ea_extra", [OFF, ZERO], ids=["switched-off", "alpha=beta=0"])
def test_equals_vanilla_transformer(ea_extra, monkeypatch):
    # fairseq's attention takes its softmax in float32 even for float64 input; the EA
    # module keeps float64. Compare like with like.
    monkeypatch.setattr(fairseq.modules.multihead_attention.utils, "softmax", softmax_keeping_float64)
    d, vanilla, ea = _vanilla_and_ea(ea_extra)
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    keep = _non_pad(batch, d)
    src_keep = batch["src_tokens"].ne(d.pad()).t()  # (S, B)
    with torch.no_grad():
        # fairseq's fused attention differs from its own explicit path by ~1e-7 in float64
        torch.testing.assert_close(full_logits(ea, batch)[keep], full_logits(vanilla, batch)[keep],
                                   rtol=0, atol=1e-6)
        # against fairseq's explicit attention path: equal to rounding
        _explicit_attention(vanilla)
        if ea_extra is OFF:
            _explicit_attention(ea)
        for run in (full_logits, incremental_logits):
            torch.testing.assert_close(run(ea, batch)[keep], run(vanilla, batch)[keep], rtol=0, atol=1e-12)
        enc_v = vanilla.encoder(batch["src_tokens"], batch["src_lengths"])["encoder_out"][0]
        enc_e = ea.encoder(batch["src_tokens"], batch["src_lengths"])["encoder_out"][0]
        torch.testing.assert_close(enc_e[src_keep], enc_v[src_keep], rtol=0, atol=1e-12)


def test_default_ea_differs_from_vanilla():
    """Control for the test above: with EA on, the same weights give other outputs."""
    d, vanilla, ea = _vanilla_and_ea([])
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    keep = _non_pad(batch, d)
    with torch.no_grad():
        diff = (full_logits(ea, batch)[keep] - full_logits(vanilla, batch)[keep]).abs().max()
    assert diff > 1e-3


def test_tiny_args_are_really_tiny():
    # guard for the helpers: the models above are the small ones
    model = build_model("ea_transformer", [])
    assert model.encoder.embed_tokens.embedding_dim == 16 and len(model.decoder.layers) == 3
    assert "--share-all-embeddings" in TINY
