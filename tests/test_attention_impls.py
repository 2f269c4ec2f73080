"""The fused path against the eager reference (``--ea-attn-impl``), over every case family:
the three stacks, kernels 1/3/5, every activation, alpha and beta at 0 and 1, masks of
every kind (key padding, float attn_mask values, padded query rows, rows with no key),
attention dropout, frozen conv weights, incremental decoding, beam reorders and beam
search; in float64 (to 1e-12 on outputs and maps, 1e-10 on gradients) and in half
precision (bfloat16 / float16, to a stated fraction of the largest value). Also: what the
fused path keeps for backward, and that it agrees with fairseq's own attention where EA
is a no-op.

Outputs at padded query rows and map cells that are masked are not defined (the next
layer zeroes them), so they are left out of the comparisons."""

import fairseq.modules.multihead_attention
import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.sequence_generator import SequenceGenerator
from helpers import (
    EA_ALL, beam_batch_and_order, build_model, full_logits, incremental_logits, make_dictionary, random_batch,
    set_impl, softmax_keeping_float64,
)

from ea_fairseq.modules import EASpec, EvolvingMultiheadAttention
from ea_fairseq.modules import evolving_attention

# --- one attention module ------------------------------------------------------------------

KINDS = {  # name: (causal conv, cross-attention)
    "encoder": (False, False),
    "decoder": (True, False),
    "cross": (True, True),
}
# (alpha, beta, kernel, has a previous map): extremes of each, and layer 1 (no map yet)
SETTINGS = [(0.6, 0.5, 3, True), (1.0, 0.0, 5, True), (0.0, 0.7, 3, True), (0.3, 1.0, 1, True), (0.5, 0.5, 3, False)]


def _module(kind, alpha, beta, kernel, has_prev, activation="leaky_relu", dropout=0.0, dtype=torch.float64):
    causal, cross = KINDS[kind]
    torch.manual_seed(1)
    spec = EASpec(alpha=alpha, beta=beta, kernel_size=kernel, causal=causal, activation=activation,
                  init="kaiming", has_conv=has_prev and alpha > 0)
    which = {"encoder_decoder_attention": True} if cross else {"self_attention": True}
    mod = EvolvingMultiheadAttention(16, 4, ea=spec, dropout=dropout, **which).to(dtype).train()
    if spec.has_conv:
        with torch.no_grad():
            mod.ea_conv.conv.bias.normal_()
    return mod


def _inputs(kind, has_prev, dtype=torch.float64, B=3, T=7):
    """x (T, B, 16), memory (S, B, 16), prev (B, 4, T, S) or None, and fairseq's masks: key
    padding, a causal float attn_mask with one added value (decoder), padded query rows."""
    causal, cross = KINDS[kind]
    S = T - 2 if cross else T
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, 16, generator=g).to(dtype).requires_grad_()
    mem = torch.randn(S, B, 16, generator=g).to(dtype).requires_grad_() if cross else x
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -2:] = True
    qpm = torch.zeros(B, T, dtype=torch.bool)
    qpm[2, -3:] = True
    attn_mask = None
    if causal and not cross:
        attn_mask = torch.triu(torch.full((T, S), float("-inf")), 1).to(dtype)
        attn_mask[3, 1] = 0.25  # a float mask value, added to the logits
    prev = None
    if has_prev:
        prev = torch.randn(B, 4, T, S, generator=g).to(dtype).requires_grad_()
    return x, mem, prev, kpm, attn_mask, qpm


def _keep(kpm, attn_mask, qpm):
    """(B, 1, T, S): cells where maps are defined."""
    keep = ~kpm[:, None, None, :] & ~qpm[:, None, :, None]
    if attn_mask is not None:
        keep = keep & ~attn_mask.isinf()
    return keep


def _run(mod, impl, inputs, need_weights=False):
    """Output, map and every gradient of one call under ``impl``, with the same dropout draws."""
    x, mem, prev, kpm, attn_mask, qpm = inputs
    set_impl(mod, impl)
    mod.zero_grad(set_to_none=True)
    for t in (x, mem, prev):
        if t is not None:
            t.grad = None
    torch.manual_seed(0)
    out, weights, a = mod(x, mem, mem, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
                          ea_prev=prev, query_padding_mask=qpm)
    keep = _keep(kpm, attn_mask, qpm)
    rows = ~qpm.T.unsqueeze(-1)  # (T, B, 1)
    g = torch.Generator().manual_seed(3)
    # the gradient reaches A_l from the softmax and from the next layer
    w_out = torch.randn(out.shape, generator=g).to(out) * rows
    w_map = torch.randn(a.shape, generator=g).to(a) * keep
    ((out * w_out).sum() + (a * w_map).sum()).backward()
    grads = {"x": x.grad, "memory": mem.grad if mem is not x else None, "prev": None if prev is None else prev.grad}
    grads.update({n: p.grad for n, p in mod.named_parameters()})
    return (out * rows).detach(), (a * keep).detach(), grads, weights


def _assert_same(got, ref, atol_out=1e-12, atol_grad=1e-10):
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=atol_out)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=atol_out)
    assert set(got[2]) == set(ref[2])
    for n, g in ref[2].items():
        assert (got[2][n] is None) == (g is None), n
        if g is not None:
            torch.testing.assert_close(got[2][n], g, rtol=0, atol=atol_grad, msg=n)


@pytest.mark.parametrize("activation", ["linear", "relu", "leaky_relu", "gelu", "tanh"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("alpha,beta,kernel,has_prev", SETTINGS)
@pytest.mark.parametrize("variant", ["plain", "dropout", "frozen-conv", "remakes-probs"])
def test_module_fused_equals_eager(activation, kind, alpha, beta, kernel, has_prev, variant, monkeypatch):
    if variant == "remakes-probs":  # keep A and make P again in backward, as in half precision
        monkeypatch.setattr(evolving_attention, "_keeps_probs", lambda a, probs: False)
    mod = _module(kind, alpha, beta, kernel, has_prev, activation, dropout=0.3 if variant == "dropout" else 0.0)
    if variant == "frozen-conv":
        mod.requires_grad_(False)
        mod.k_proj.requires_grad_(True)
    inputs = _inputs(kind, has_prev)
    if variant == "dropout" and not has_prev:
        # layer 1 drops out inside scaled_dot_product_attention, with its own draws: the
        # same only in expectation, so compare with dropout off there
        mod.eval()
    _assert_same(_run(mod, "fused", inputs), _run(mod, "eager", inputs))


@pytest.mark.parametrize("kind", list(KINDS))
def test_module_weights_are_the_same_probabilities(kind):
    mod = _module(kind, 0.6, 0.5, 3, True).eval()
    inputs = _inputs(kind, True)
    (*_, w_fused), (*_, w_eager) = (_run(mod, impl, inputs, need_weights=True) for impl in ("fused", "eager"))
    qpm = inputs[-1]
    rows = ~qpm[:, :, None]  # (B, T, 1)
    torch.testing.assert_close(w_fused * rows, w_eager * rows, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("has_prev", [False, True])
def test_rows_with_no_key_get_zero_probabilities_and_finite_gradients(impl, has_prev):
    mod = _module("encoder", 0.6, 0.5, 3, has_prev)
    set_impl(mod, impl)
    T, B = 5, 2
    x = torch.randn(T, B, 16, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(B, 4, T, T, dtype=torch.float64) if has_prev else None
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[1] = True  # query row 1 may attend to no key
    out, w, a = mod(x, x, x, attn_mask=mask, need_head_weights=True, ea_prev=prev)
    assert torch.isfinite(out).all() and torch.isfinite(a).all()
    assert torch.equal(w[:, :, 1], torch.zeros_like(w[:, :, 1]))
    torch.testing.assert_close(w[:, :, [0, 2, 3, 4]].sum(-1), torch.ones(4, B, 4, dtype=torch.float64))
    (out.sum() + a.sum()).backward()
    assert torch.isfinite(x.grad).all()
    # without weights (layer 1 fused: scaled_dot_product_attention) the row is out_proj's bias
    out2, _, _ = mod(x, x, x, attn_mask=mask, need_weights=False, ea_prev=prev)
    torch.testing.assert_close(out2[1], mod.out_proj.bias.expand(B, 16), rtol=0, atol=1e-12)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_without_evolution_it_is_fairseqs_attention(impl, monkeypatch):
    """alpha = beta = 0 (no conv, no link): a non-binary float attn_mask and key padding
    give the outputs and weights of fairseq's own explicit path."""
    monkeypatch.setattr(fairseq.modules.multihead_attention.utils, "softmax", softmax_keeping_float64)
    torch.manual_seed(0)
    spec = EASpec(alpha=0.0, beta=0.0, kernel_size=3, causal=False, activation="linear", init="dirac",
                  has_conv=False, impl=impl)
    ea = EvolvingMultiheadAttention(16, 4, ea=spec, self_attention=True).double().eval()
    ref = MultiheadAttention(16, 4, self_attention=True).double().eval()
    ref.load_state_dict(ea.state_dict())
    ref.skip_embed_dim_check = True  # fairseq's explicit path, which adds the float mask
    T, B = 6, 3
    x = torch.randn(T, B, 16, dtype=torch.float64)
    bias = torch.randn(T, T, dtype=torch.float64)
    bias[0, 2] = float("-inf")
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :2] = True
    prev = torch.randn(B, 4, T, T, dtype=torch.float64)  # beta = 0: not used
    want, want_w = ref(x, x, x, key_padding_mask=kpm, attn_mask=bias, need_weights=True)
    with torch.no_grad():
        for need in (True, False):
            got, got_w, _ = ea(x, x, x, key_padding_mask=kpm, attn_mask=bias, need_weights=need, ea_prev=prev)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
            if need:
                torch.testing.assert_close(got_w.double(), want_w.double(), rtol=0, atol=1e-12)


def test_alpha_zero_builds_no_convolution_in_any_layer():
    """The residual-only arm (--ea-alpha 0): every stack links its maps, no layer has a conv."""
    model = build_model("ea_transformer", ["--ea-alpha", "0", "--ea-cross-attn"])
    mods = [m for m in model.modules() if isinstance(m, EvolvingMultiheadAttention)]
    assert len(mods) == 9 and all(m.ea_conv is None for m in mods)
    assert not any("ea_conv" in n for n, _ in model.named_parameters())


def test_an_unknown_impl_is_refused():
    spec = EASpec(alpha=0.5, beta=0.5, kernel_size=3, causal=False, activation="linear", init="dirac",
                  has_conv=True, impl="flash")
    with pytest.raises(ValueError, match="--ea-attn-impl must be one of eager, fused"):
        EvolvingMultiheadAttention(16, 4, ea=spec, self_attention=True)


# --- whole models -----------------------------------------------------------------------------

CONFIGS = {
    "all-stacks": EA_ALL,
    "k5-gelu": EA_ALL + ["--ea-kernel-size", "5", "--ea-activation", "gelu"],
    "defaults+cross": ["--ea-cross-attn"],
    "residual-only": ["--ea-cross-attn", "--ea-alpha", "0"],
    "attention-dropout": EA_ALL + ["--attention-dropout", "0.2"],
}


def _loss_and_grads(model, batch, impl):
    set_impl(model, impl)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws (layers > 1) in both paths
    out = full_logits(model, batch)
    keep = batch["prev_output_tokens"].ne(model.decoder.dictionary.pad())
    out = out[keep]
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_training_step_fused_equals_eager(name):
    model = build_model("ea_transformer", CONFIGS[name]).train()
    if name == "attention-dropout":
        # layer 1 of each stack drops out inside scaled_dot_product_attention (its own
        # draws): compare with that layer's dropout off
        for m in model.modules():
            if isinstance(m, EvolvingMultiheadAttention) and m.ea_conv is None:
                m.dropout_module.p = 0.0
    batch = random_batch(model.encoder.dictionary, [6, 9, 3, 7], [5, 8, 2, 6])
    out_ref, grads_ref = _loss_and_grads(model, batch, "eager")
    out, grads = _loss_and_grads(model, batch, "fused")
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=0, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", ["all-stacks", "k5-gelu", "residual-only"])
def test_incremental_decoding_fused_equals_eager_and_full(name):
    """The decoding step (a matrix product on the fused path, F.conv2d on the eager one)."""
    model = build_model("ea_transformer", CONFIGS[name])
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    keep = batch["prev_output_tokens"].ne(d.pad())
    with torch.no_grad():
        full = full_logits(set_impl(model, "eager"), batch)
        for impl in ("eager", "fused"):
            inc = incremental_logits(set_impl(model, impl), batch)
            torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("shared", [True, False])
def test_reorder_equals_permuted_batch(impl, shared):
    """Decode a few steps, reorder the state as beam search does (each hypothesis picks,
    with repeats, among those of its own sentence), decode on: a fresh decode of the
    reordered batch; with the cross-attention keys kept once per sentence (fairseq's
    ``set_beam_size`` shortcut) or per hypothesis. (fairseq's cache of cross-attention keys,
    which EA modules keep as fairseq's own module does, assumes this beam structure.)"""
    model = set_impl(build_model("ea_transformer", EA_ALL), impl)
    d = model.encoder.dictionary
    beam, n_sent, T, t0 = 3, 2, 7, 3
    batch, new_order = beam_batch_and_order(d, True, beam, n_sent, T)
    if shared:
        model.set_beam_size(beam)
    prev = batch["prev_output_tokens"]
    with torch.no_grad():
        enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
        state = {}
        for t in range(t0):
            model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
        kv = model.decoder.layers[0].encoder_attn._get_input_buffer(state)
        assert kv["prev_key"].size(0) == (n_sent if shared else n_sent * beam)
        model.decoder.reorder_incremental_state_scripting(state, new_order)
        enc = model.encoder.reorder_encoder_out(enc, new_order)
        outs = [model.decoder(prev[new_order][:, : t + 1], encoder_out=enc, incremental_state=state)[0]
                for t in range(t0, T)]
        expected = full_logits(model, {k: v[new_order] for k, v in batch.items()})[:, t0:]
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=0, atol=1e-9)


def test_beam_search_fused_equals_eager():
    """SequenceGenerator with the model's set_beam_size (encoder keys once per sentence):
    the same hypotheses and scores on both paths."""
    model = build_model("ea_transformer", EA_ALL, dtype=torch.float32)
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [2] * 4, seed=9)
    sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
    results = {}
    for impl in ("fused", "eager"):
        with torch.no_grad():
            hyps = SequenceGenerator([set_impl(model, impl)], d, beam_size=4, max_len_b=10).generate([model], sample)
        results[impl] = [(h["tokens"].tolist(), round(float(h["score"]), 4)) for nbest in hyps for h in nbest]
    assert all(m.beam_size == 4 for m in model.decoder.modules() if isinstance(m, EvolvingMultiheadAttention))
    assert results["fused"] == results["eager"]


# half precision on the CPU, as fractions of the largest reference value: the noise that
# rounding alone makes. Measured on both paths against float64 runs of the same weights,
# with smooth activations (a ReLU's kink turns a rounding difference in its input into a
# whole gradient entry): the key projections' biases, whose gradient is nearly zero (the
# softmax ignores a shift per row), move by up to 37 % in bfloat16 and 4 % in float16; the
# median tensor by about 0.8 % and 0.1 %.
HALF_TOL = {torch.bfloat16: 0.3, torch.float16: 0.05}
SMOOTH = ["--ea-cross-attn", "--ea-conv-init", "kaiming", "--ea-activation", "gelu", "--ea-alpha", "0.7",
          "--ea-beta", "0.4", "--activation-fn", "gelu"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fused_is_as_accurate_as_eager(dtype):
    """A training step and incremental decoding in half precision, against float64 runs of
    the same (rounded) weights: each gradient of the fused path is within twice the eager
    path's error plus HALF_TOL, and over all tensors its median error is within twice
    eager's plus 0.2 %."""
    import statistics

    model = build_model("ea_transformer", SMOOTH, dtype=torch.float32).to(dtype).train()
    exact = build_model("ea_transformer", SMOOTH, dtype=torch.float64).train()
    exact.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    out_ref, grads_ref = _loss_and_grads(exact, batch, "eager")
    runs = {impl: _loss_and_grads(model, batch, impl) for impl in ("eager", "fused")}
    assert runs["fused"][0].dtype == dtype
    rel = {impl: {} for impl in runs}
    for name, ref in [("out", out_ref)] + list(grads_ref.items()):
        for impl, (out, grads) in runs.items():
            got = out if name == "out" else grads[name]
            assert torch.isfinite(got).all(), (impl, name)
            rel[impl][name] = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        assert rel["fused"][name] <= 2 * rel["eager"][name] + HALF_TOL[dtype], (name, rel["fused"][name], rel["eager"][name])
    median = {impl: statistics.median(r.values()) for impl, r in rel.items()}
    assert median["fused"] <= 2 * median["eager"] + 0.002, median
    keep = batch["prev_output_tokens"].ne(d.pad())
    model.eval()
    with torch.no_grad():
        full = full_logits(set_impl(model, "eager"), batch)
        inc = incremental_logits(set_impl(model, "fused"), batch)
    torch.testing.assert_close(inc[keep].float(), full[keep].float(), rtol=0,
                               atol=0.1 * HALF_TOL[dtype] * full.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_matches_float32(dtype):
    """A half-precision model (fused) against float32 weights, and beam search in it."""
    ref = build_model("ea_transformer", EA_ALL, dtype=torch.float32).train()
    half = build_model("ea_transformer", EA_ALL, dtype=torch.float32).to(dtype).train()
    half.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    d = ref.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    keep = batch["prev_output_tokens"].ne(d.pad())
    out_ref, out_half = full_logits(ref, batch), full_logits(half, batch)
    tol = 0.2 * HALF_TOL[dtype] * out_ref.abs().max().item()
    torch.testing.assert_close(out_half.float()[keep], out_ref[keep], rtol=0, atol=tol)
    out_half.float()[keep].pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters())
    half.eval()
    with torch.no_grad():
        sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
        hyps = SequenceGenerator([half], d, beam_size=3, max_len_b=8).generate([half], sample)
    assert all(torch.isfinite(h["positional_scores"]).all() for nbest in hyps for h in nbest)


def _saved(model, batch):
    """The tensors autograd saves for backward in one forward pass, one per storage."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_logits(model, batch).sum()
    return list(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_keeps_two_maps_per_evolving_layer(dtype):
    """Layers > 1 keep two (B, H, Tq, Tk) maps each: the conv's input (M zero-padded, k-1
    more rows and keys) and P in float32, or A in half precision; layer 1 keeps none. The
    eager path keeps four or more in those layers."""
    d = make_dictionary()
    batch = random_batch(d, [30, 28, 25], [29, 27, 20])
    ea = build_model("ea_transformer", ["--ea-cross-attn"], dictionary=d, dtype=dtype).train()
    eager = sum(t.untyped_storage().nbytes() for t in _saved(set_impl(ea, "eager"), batch))
    saved = _saved(set_impl(ea, "fused"), batch)
    B, H, S, T = 3, 4, 30, 29
    maps = sorted((tuple(t.shape), t.dtype) for t in saved if t.dim() == 4 and t.shape[:2] == (B, H)
                  and t.size(-1) >= T)  # not q, k, v (B, H, T, head_dim)
    soft = torch.float32 if dtype == torch.float32 else dtype
    # layers 2 and 3 of each stack: encoder (S x S), decoder (T x T), cross (T x S)
    expected = 2 * [((B, H, S + 2, S + 2), dtype), ((B, H, S, S), soft), ((B, H, T + 2, T + 2), dtype),
                    ((B, H, T, T), soft), ((B, H, T + 2, S + 2), dtype), ((B, H, T, S), soft)]
    assert maps == sorted(expected)
    fused = sum(t.untyped_storage().nbytes() for t in saved)
    two_maps = sum(torch.Size(shape).numel() * torch.finfo(dt).bits // 8 for shape, dt in expected)
    assert fused < eager - two_maps, (eager, fused, two_maps)
