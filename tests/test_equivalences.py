"""The behaviour claims of evolving attention, each as an equivalence:
incremental == full forward, causality, padding invariance, beam reordering,
beam search re-scoring, activation checkpointing, no unused parameters."""

import fairseq.modules.multihead_attention
import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.sequence_generator import SequenceGenerator
from helpers import (
    EA_ALL, beam_batch_and_order, build_model, full_logits, incremental_logits, make_dictionary, random_batch, softmax_keeping_float64,
)

from ea_fairseq.modules import EvolvingMultiheadAttention

SELF_ONLY = ["--ea-conv-init", "kaiming", "--ea-activation", "relu", "--ea-alpha", "0.6", "--ea-beta", "0.5"]
CONFIGS = {
    "self-attn-EA": SELF_ONLY,
    "all-stacks-EA": EA_ALL,
    "k5-gelu": EA_ALL + ["--ea-kernel-size", "5", "--ea-activation", "gelu"],
    "k1": EA_ALL + ["--ea-kernel-size", "1"],
    # the default (linear) activation with trained-looking (kaiming) taps
    "linear-kaiming": ["--ea-cross-attn", "--ea-conv-init", "kaiming", "--ea-alpha", "0.7", "--ea-beta", "0.4"],
    "default-init": ["--ea-cross-attn"],
}


def _keep(batch, d):
    return batch["prev_output_tokens"].ne(d.pad())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_equals_full_forward(name):
    model = build_model("ea_transformer", CONFIGS[name])
    d = model.encoder.dictionary
    for batch in (random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6]), random_batch(d, [4, 4], [7, 7], seed=5)):
        with torch.no_grad():
            full, inc = full_logits(model, batch), incremental_logits(model, batch)
        keep = _keep(batch, d)
        torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["self-attn-EA", "all-stacks-EA", "k5-gelu", "linear-kaiming"])
def test_incremental_equals_full_forward_float32(name):
    model = build_model("ea_transformer", CONFIGS[name], dtype=torch.float32)
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    with torch.no_grad():
        full, inc = full_logits(model, batch), incremental_logits(model, batch)
    keep = _keep(batch, d)
    torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=1e-5)


def _future_leak(model, t: int) -> float:
    """Largest change of decoder outputs at positions <= t when every target token
    after t is replaced."""
    d = model.encoder.dictionary
    batch = random_batch(d, [7, 5], [9, 9])
    other = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(11)
    other["prev_output_tokens"][:, t + 1:] = torch.randint(d.nspecial, len(d), other["prev_output_tokens"][:, t + 1:].shape, generator=g)
    with torch.no_grad():
        a, b = full_logits(model, batch), full_logits(model, other)
    return (a[:, : t + 1] - b[:, : t + 1]).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_is_causal(name):
    model = build_model("ea_transformer", CONFIGS[name])
    for t in (0, 3, 6):
        assert _future_leak(model, t) == 0.0

    # and the gradient of outputs <= t w.r.t. the embeddings of later tokens is zero
    d = model.encoder.dictionary
    batch = random_batch(d, [7, 5], [9, 9])
    enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
    emb = {}

    def keep_embedding(module, inputs, output):
        output.retain_grad()
        emb["x"] = output
    handle = model.decoder.embed_tokens.register_forward_hook(keep_embedding)
    out, _ = model.decoder(batch["prev_output_tokens"], encoder_out=enc)
    handle.remove()
    t = 4
    out[:, : t + 1].sum().backward()
    grad = emb["x"].grad  # (B, T, C)
    assert grad[:, t + 1:].abs().max().item() == 0.0
    assert grad[:, : t + 1].abs().max().item() > 0.0


def test_causality_test_catches_a_symmetric_decoder_conv():
    """Control: make the decoder convs symmetric along the query axis; the leak
    measure above must see it."""
    model = build_model("ea_transformer", CONFIGS["all-stacks-EA"])
    assert _future_leak(model, 3) == 0.0
    for m in model.decoder.modules():
        if isinstance(m, EvolvingMultiheadAttention) and m.ea_conv is not None:
            m.ea_conv.causal = False
    assert _future_leak(model, 3) > 1e-6


@pytest.mark.parametrize("name", ["self-attn-EA", "all-stacks-EA", "k5-gelu"])
def test_outputs_do_not_depend_on_batch_padding(name, monkeypatch):
    # fairseq's own (cross-)attention takes its softmax in float32 even for float64 input
    monkeypatch.setattr(fairseq.modules.multihead_attention.utils, "softmax", softmax_keeping_float64)
    atol = 1e-9
    model = build_model("ea_transformer", CONFIGS[name])
    d = model.encoder.dictionary
    batch = random_batch(d, [4, 9, 6, 2], [3, 8, 5, 7], seed=7)
    keep = _keep(batch, d)
    with torch.no_grad():
        together = full_logits(model, batch)
        for b in range(4):
            s, t = int(batch["src_lengths"][b]), int(keep[b].sum())
            alone = {
                "src_tokens": batch["src_tokens"][b:b + 1, -s:],
                "src_lengths": batch["src_lengths"][b:b + 1],
                "prev_output_tokens": batch["prev_output_tokens"][b:b + 1, :t],
            }
            torch.testing.assert_close(full_logits(model, alone)[0], together[b, :t], rtol=0, atol=atol)
            # and padded further on both sides than the batch needs
            pad = d.pad()
            padded = {
                "src_tokens": torch.cat([torch.full((1, 5), pad), alone["src_tokens"]], dim=1),
                "src_lengths": alone["src_lengths"],
                "prev_output_tokens": torch.cat([alone["prev_output_tokens"], torch.full((1, 4), pad)], dim=1),
            }
            torch.testing.assert_close(full_logits(model, padded)[0, :t], together[b, :t], rtol=0, atol=atol)


def _decode_steps(model, enc, prev, state, start, stop):
    outs = []
    for t in range(start, stop):
        o, _ = model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
        outs.append(o)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", ["self-attn-EA", "all-stacks-EA", "default-init", "k5-gelu"])
def test_reorder_incremental_state_equals_permuted_batch(name):
    """Decode a few steps, reorder the incremental state (and encoder output) with
    new_order, decode on: the outputs equal a fresh decode of the reordered batch. The
    order picks (with repeats) among the hypotheses of the same sentence, as
    SequenceGenerator does (fairseq's cross-attention cache relies on that)."""
    model = build_model("ea_transformer", CONFIGS[name])
    d = model.encoder.dictionary
    beam, n_sent, T, t0 = 3, 2, 7, 3
    batch, new_order = beam_batch_and_order(d, True, beam, n_sent, T)

    with torch.no_grad():
        enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
        state = {}
        _decode_steps(model, enc, batch["prev_output_tokens"], state, 0, t0)
        model.decoder.reorder_incremental_state_scripting(state, new_order)
        enc = model.encoder.reorder_encoder_out(enc, new_order)
        prev = batch["prev_output_tokens"][new_order]
        continued = _decode_steps(model, enc, prev, state, t0, T)

        permuted = {k: v[new_order] for k, v in batch.items()}
        expected = full_logits(model, permuted)[:, t0:]
    torch.testing.assert_close(continued, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["self-attn-EA", "all-stacks-EA"])
def test_reorders_in_a_row_equal_their_composition(name):
    """Two reorders with no step between them (the second one dropping a sentence, as
    SequenceGenerator does when one finishes) act as their composition: the outputs equal
    a fresh decode of the batch in the composed order."""
    model = build_model("ea_transformer", CONFIGS[name])
    d = model.encoder.dictionary
    beam, n_sent, T, t0 = 3, 2, 7, 3
    batch, first = beam_batch_and_order(d, True, beam, n_sent, T)
    second = torch.tensor([2, 0, 0])  # the first sentence's hypotheses only, in a new order
    composed = first[second]

    with torch.no_grad():
        enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
        state = {}
        _decode_steps(model, enc, batch["prev_output_tokens"], state, 0, t0)
        for order in (first, second):
            model.decoder.reorder_incremental_state_scripting(state, order)
            enc = model.encoder.reorder_encoder_out(enc, order)
        continued = _decode_steps(model, enc, batch["prev_output_tokens"][composed], state, t0, T)
        expected = full_logits(model, {k: v[composed] for k, v in batch.items()})[:, t0:]
    torch.testing.assert_close(continued, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["self-attn-EA", "all-stacks-EA", "default-init"])
def test_beam_search_hypotheses_rescore_to_their_positional_scores(name):
    model = build_model("ea_transformer", CONFIGS[name])
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7, 5], [2] * 5, seed=9)
    gen = SequenceGenerator([model], d, beam_size=5, max_len_b=12, min_len=2)
    sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
    with torch.no_grad():
        hypos = gen.generate([model], sample)
    checked = 0
    for b, nbest in enumerate(hypos):
        assert len(nbest) == 5
        s = int(batch["src_lengths"][b])
        for h in nbest:
            y = h["tokens"]  # ends with EOS
            prev = torch.cat([torch.tensor([d.eos()]), y[:-1]]).unsqueeze(0)
            with torch.no_grad():
                out, _ = model(batch["src_tokens"][b:b + 1, -s:], batch["src_lengths"][b:b + 1], prev)
                lprobs = model.get_normalized_probs((out, None), log_probs=True)[0]
            rescored = lprobs.gather(1, y.unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(h["positional_scores"].to(rescored), rescored, rtol=0, atol=1e-5)
            checked += 1
    assert checked == 25


def test_incremental_state_keys_are_per_module():
    model = build_model("ea_transformer", CONFIGS["all-stacks-EA"])
    ids = [m._incremental_state_id for m in model.decoder.modules() if isinstance(m, MultiheadAttention)]
    assert len(ids) == 2 * 3 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", ["all-stacks-EA", "default-init"])
def test_every_parameter_gets_a_gradient(name):
    model = build_model("ea_transformer", CONFIGS[name]).train()
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3], [5, 8, 2])
    full_logits(model, batch).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_activation_checkpointing_gives_the_same_gradients():
    """Maps pass between layers as explicit arguments, so checkpointed layers
    recompute them and back-propagate through them."""
    d = make_dictionary()
    plain = build_model("ea_transformer", CONFIGS["all-stacks-EA"], dictionary=d).train()
    ckpt = build_model("ea_transformer", CONFIGS["all-stacks-EA"] + ["--checkpoint-activations"], dictionary=d).train()
    ckpt.load_state_dict(plain.state_dict())
    batch = random_batch(d, [6, 9, 3], [5, 8, 2])
    for m in (plain, ckpt):
        full_logits(m, batch).pow(2).sum().backward()
    grads = dict(ckpt.named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=0, atol=1e-10, msg=n)


def test_left_padded_targets_give_finite_outputs_and_gradients():
    """A left-padded target row has no key to attend to in its first positions."""
    model = build_model("ea_transformer", EA_ALL).train()
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 4], [3, 3], seed=2)
    prev = batch["prev_output_tokens"]
    padded = torch.cat([torch.full((2, 3), d.pad()), prev], dim=1)  # left-padded targets
    enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
    out, _ = model.decoder(padded, encoder_out=enc)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
