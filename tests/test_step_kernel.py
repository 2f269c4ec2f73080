"""EA's one-pass CPU kernels (ea_fairseq/modules/step_kernel.py and
ea_fairseq/csrc/ea_step.cpp): the decoding step and the whole-map conv give the same
numbers as the reference conv they stand in for (forward and the backward's input
gradient); whole decodes, beam searches, training calls with every mask, a model's
training gradients and scoring unchanged; autograd never bypassed, a bad beam order
stopped, and a clear fallback where the library cannot be built."""

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator
from helpers import beam_batch_and_order, build_model, full_logits, incremental_logits, random_batch

from ea_fairseq.modules import EvolvingMultiheadAttention, step_kernel
from ea_fairseq.modules.evolving_attention import EAConv

# the linear activation (the default) is what the one pass covers
LINEAR = {
    "cross-kaiming": ["--ea-cross-attn", "--ea-conv-init", "kaiming", "--ea-alpha", "0.7", "--ea-beta", "0.4"],
    "self-k5": ["--ea-conv-init", "kaiming", "--ea-kernel-size", "5", "--ea-alpha", "0.6", "--ea-beta", "0.5"],
    "default-init": ["--ea-cross-attn"],
}


@pytest.fixture
def settings(monkeypatch):
    """monkeypatch for step_kernel's environment variables: they are read once per
    process, so load() reads them again after each change here and after the test."""
    class Settings:
        def setenv(self, name, value):
            monkeypatch.setenv(name, value)
            step_kernel.reset()

    step_kernel.reset()
    yield Settings()
    step_kernel.reset()  # before monkeypatch puts the environment back: read it lazily


@pytest.fixture
def one_pass(monkeypatch, settings):
    """The library required (a test fails where it cannot be built), and a count of the
    steps it ran, with the arguments of each."""
    settings.setenv(step_kernel.ENV_MODE, "require")
    assert step_kernel.load() is not None
    calls = []
    original = step_kernel.step

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(step_kernel, "step", spy)
    return calls


def _conv_and_randn(heads, k, causal, dtype, g):
    """An EAConv with random taps and bias, and randn(*shape) in ``dtype`` drawn from g."""
    conv = EAConv(heads, k, causal, "linear", "kaiming").to(dtype)
    with torch.no_grad():
        conv.conv.bias.normal_(generator=g)
    return conv, lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _reference_step(conv, logits, prev, beta, keep, history, order, alpha):
    """The step with PyTorch ops and F.conv2d over the window (evolve_step's reference
    path): the window in the beam's order, M written into it, the conv, the key mask."""
    window, m = conv.step_window(history, logits, order)
    m.copy_(logits if prev is None else torch.lerp(logits, prev, beta))
    if keep is not None:
        m.mul_(keep)
    a, kept, _ = conv.evolve_step(window, alpha, matmul=False)
    return (a if keep is None else a * keep), kept


CASES = list(itertools.product(
    [torch.float64, torch.float32],
    [3, 5],  # kernel size
    [4, 6],  # heads: 6 = a group of 4 output channels and 2 alone
    [1, 17, 40],  # keys: one, and either side of the 16- and 8-key blocks
    ["first", "self", "cross"],  # no history yet; history one key short; as wide
))


@pytest.mark.parametrize("dtype,k,heads,src_len,history", CASES)
def test_one_pass_step_equals_the_reference_conv(one_pass, dtype, k, heads, src_len, history):
    g = torch.Generator().manual_seed(src_len * 31 + k * 7 + heads)
    n_old, bsz, alpha, beta = 5, 7, 0.7, 0.4
    conv, randn = _conv_and_randn(heads, k, True, dtype, g)

    # logits as _scores hands them on: a view, not contiguous
    logits = randn(heads, bsz, 1, src_len).transpose(0, 1)
    prev = randn(bsz, heads, 1, src_len)
    keep = (torch.rand(bsz, 1, 1, src_len, generator=g) > 0.3).to(dtype)
    hist = None if history == "first" else randn(heads, k - 1, n_old, max(1, src_len - (history == "self")))
    order = None if hist is None else torch.randint(0, n_old, (bsz,), generator=g)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-5)
    with torch.no_grad():
        for p, m in ((prev, keep), (None, None), (prev, keep[:1])):  # with / without mix and mask, broadcast mask
            want, want_rows = _reference_step(conv, logits, p, beta, m, hist, order, alpha)
            taps, bias = conv.step_taps(dtype, alpha)
            got, rows = step_kernel.step(logits, p, beta, m, hist, order, taps, bias, k)
            torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(rows, want_rows, rtol=0, atol=0)  # copies, exact
    assert len(one_pass) == 3


def test_one_pass_step_stops_a_beam_order_out_of_range(one_pass):
    conv = EAConv(4, 3, True, "linear", "kaiming")
    logits, hist = torch.randn(6, 4, 1, 9), torch.randn(4, 2, 3, 8)
    taps, bias = conv.step_taps(torch.float32, 0.5)
    for bad in (3, -1):
        order = torch.tensor([0, 1, 2, bad, 0, 1])
        with pytest.raises(IndexError, match=f"hypothesis 3 the index {bad}, out of range for 3"):
            step_kernel.step(logits, None, 0.5, None, hist, order, taps, bias, 3)
    with pytest.raises(ValueError, match="no order maps 6 onto them"):
        step_kernel.step(logits, None, 0.5, None, hist, None, taps, bias, 3)


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_incremental_in_one_pass_equals_full_forward(one_pass, name, dtype, atol):
    model = build_model("ea_transformer", LINEAR[name], dtype=dtype)
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])  # padded sources: a key mask in cross-attention
    with torch.no_grad():
        full, inc = full_logits(model, batch), incremental_logits(model, batch)
    keep = batch["prev_output_tokens"].ne(d.pad())
    torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=atol)
    assert one_pass, "no decoding step ran in one pass"
    if "--ea-cross-attn" in LINEAR[name]:
        assert any(args[3] is not None for args in one_pass), "no one-pass step had a key mask"


@pytest.mark.parametrize("structured", [True, False])
def test_reorders_in_one_pass_equal_a_permuted_batch(one_pass, structured):
    """Two reorders before a step (the second drops a sentence) compose, and the step
    takes the rows in the composed order, as in test_equivalences for the ops path."""
    model = build_model("ea_transformer", LINEAR["cross-kaiming"])
    d = model.encoder.dictionary
    beam, n_sent, T, t0 = 3, 2, 7, 3
    batch, first = beam_batch_and_order(d, structured, beam, n_sent, T)
    second = torch.tensor([2, 0, 0, 1])
    composed = first[second]
    with torch.no_grad():
        enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
        state = {}
        for t in range(t0):
            model.decoder(batch["prev_output_tokens"][:, : t + 1], encoder_out=enc, incremental_state=state)
        for order in (first, second):
            model.decoder.reorder_incremental_state_scripting(state, order)
            enc = model.encoder.reorder_encoder_out(enc, order)
        prev = batch["prev_output_tokens"][composed]
        continued = torch.cat([model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0]
                               for t in range(t0, T)], dim=1)
        expected = full_logits(model, {k: v[composed] for k, v in batch.items()})[:, t0:]
    torch.testing.assert_close(continued, expected, rtol=0, atol=1e-9)
    assert any(args[5] is not None for args in one_pass), "no one-pass step took a beam order"


def _set_one_pass(model, on: bool):
    for m in model.modules():
        if isinstance(m, EvolvingMultiheadAttention):
            m.one_pass = on


def test_beam_search_is_the_same_in_one_pass_and_with_ops(one_pass):
    model = build_model("ea_transformer", LINEAR["default-init"], dtype=torch.float32)
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7, 5], [2] * 5, seed=9)
    sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
    results = {}
    for on in (True, False):
        _set_one_pass(model, on)
        n = len(one_pass)
        with torch.no_grad():
            results[on] = SequenceGenerator([model], d, beam_size=5, max_len_b=12, min_len=2).generate([model], sample)
        assert (len(one_pass) > n) == on
    for a, b in zip(results[True], results[False]):
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"])
            torch.testing.assert_close(x["positional_scores"], y["positional_scores"], rtol=0, atol=1e-5)


def test_decoding_with_gradients_keeps_the_autograd_ops(one_pass):
    """Where a gradient is wanted, the step must stay on autograd's graph: the one pass
    (no graph) is not taken, and the conv's weights get a gradient through decoding."""
    model = build_model("ea_transformer", LINEAR["default-init"])
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 4], [4, 5])
    inc = incremental_logits(model, batch)
    assert not one_pass
    inc.sum().backward()
    convs = [m.ea_conv for m in model.decoder.modules() if isinstance(m, EvolvingMultiheadAttention)
             and m.ea_conv is not None]
    assert convs and all(c.conv.weight.grad is not None and c.conv.weight.grad.abs().sum() > 0 for c in convs)


def test_off_and_a_missing_compiler_fall_back_to_the_ops(settings, tmp_path, caplog):
    model = build_model("ea_transformer", LINEAR["cross-kaiming"])
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3], [5, 8, 2])
    keep = batch["prev_output_tokens"].ne(d.pad())
    with torch.no_grad():
        full = full_logits(model, batch)
    settings.setenv(step_kernel.ENV_DIR, str(tmp_path / "kernels"))  # nothing built there yet
    settings.setenv("CXX", str(tmp_path / "no-such-c++"))
    settings.setenv(step_kernel.ENV_MODE, "require")
    with pytest.raises(RuntimeError, match="EA_FAIRSEQ_STEP_KERNEL=require.*no-such-c\\+\\+"):
        step_kernel.load()
    for mode in ("auto", "off"):
        settings.setenv(step_kernel.ENV_MODE, mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=step_kernel.__name__):
            assert step_kernel.load() is None
            with torch.no_grad():
                inc = incremental_logits(model, batch)
        warned = [r.getMessage() for r in caplog.records]
        if mode == "auto":
            assert len(warned) == 1 and "no-such-c++" in warned[0] and step_kernel.ENV_MODE in warned[0]
        else:
            assert not warned
        torch.testing.assert_close(inc[keep], full[keep], rtol=0, atol=1e-9)
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
    settings.setenv(step_kernel.ENV_MODE, "sometimes")
    with pytest.raises(ValueError, match="EA_FAIRSEQ_STEP_KERNEL='sometimes': expected one of auto, off, require"):
        step_kernel.load()


def test_the_build_is_cached_and_leaves_nothing_half_written(settings, tmp_path):
    settings.setenv(step_kernel.ENV_DIR, str(tmp_path))
    first = step_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert step_kernel.build() == first and first.stat().st_mtime_ns == stamp  # not built again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    # a compiler that fails leaves no library behind
    settings.setenv(step_kernel.ENV_DIR, str(tmp_path / "broken"))
    fake = tmp_path / "fake-c++"
    # it writes part of its output (the last argument), then fails
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "for a; do out=$a; done; echo half > \"$out\"\n"
                    "echo 'fake-c++: error: out of luck' >&2\nexit 3\n")
    fake.chmod(0o755)
    settings.setenv("CXX", str(fake))
    with pytest.raises(RuntimeError, match="out of luck"):
        step_kernel.build()
    assert not any((tmp_path / "broken").iterdir())


# -- whole maps (training's forward and backward, scoring without autograd) -------------------

@pytest.fixture
def map_pass(monkeypatch, settings):
    """The library required, and the arguments of each evolve_map call."""
    settings.setenv(step_kernel.ENV_MODE, "require")
    assert step_kernel.load() is not None
    calls = []
    original = step_kernel.evolve_map

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(step_kernel, "evolve_map", spy)
    return calls


def _reference_map(conv, s, prev, beta, keep, alpha):
    """The forward with PyTorch ops: M = lerp(S, prev, beta) * keep, A = lerp(M, conv(M), alpha) * keep."""
    m = s if prev is None else torch.lerp(s, prev, beta)
    m = m if keep is None else m * keep
    a = torch.lerp(m, F.conv2d(conv.padded(m), conv.conv.weight, conv.conv.bias), alpha)
    return (a if keep is None else a * keep), m


MAP_CASES = list(itertools.product(
    [torch.float64, torch.float32],
    [1, 3, 5],  # kernel size
    [4, 6],  # heads
    [1, 17, 40],  # keys: one, and either side of the 16- and 8-key blocks
    [True, False],  # causal
))


@pytest.mark.parametrize("dtype,k,heads,src_len,causal", MAP_CASES)
def test_one_pass_map_equals_the_reference_conv_forward_and_backward(map_pass, dtype, k, heads, src_len, causal):
    g = torch.Generator().manual_seed(src_len * 13 + k * 5 + heads + causal)
    bsz, tgt_len, alpha, beta = 3, 6, 0.7, 0.4
    conv, randn = _conv_and_randn(heads, k, causal, dtype, g)

    s = randn(heads, bsz, tgt_len, src_len).transpose(0, 1)  # a view, as _scores may hand it on
    prev = randn(bsz, heads, tgt_len, src_len)
    keys = (torch.rand(bsz, 1, 1, src_len, generator=g) > 0.3).to(dtype)
    cells = (torch.rand(1, 1, tgt_len, src_len, generator=g) > 0.3).to(dtype)
    rows = (torch.rand(bsz, 1, tgt_len, 1, generator=g) > 0.3).to(dtype)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-5)
    top, bottom = conv._rows_padding()
    r = k // 2
    for p, keep in ((prev, keys), (None, None), (prev, cells * keys), (prev, rows * keys)):
        with torch.no_grad():
            want, want_m = _reference_map(conv, s, p, beta, keep, alpha)
            x = s.new_zeros(bsz, heads, tgt_len + k - 1, src_len + 2 * r)
            interior = x[:, :, top: top + tgt_len, r: r + src_len]
            got = step_kernel.evolve_map(s, p, beta, keep, conv.taps_of(conv.folded_weight(alpha)),
                                         conv.conv.bias * alpha, k, top, m_out=interior)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(x, conv.padded(want_m), rtol=0, atol=0)  # M, zero-padded as the conv takes it
        # the backward's dL/dM (keep-masked): the folded weights flipped and transposed
        m = want_m.detach().requires_grad_()
        a = torch.lerp(m, conv(m), alpha)
        a = a if keep is None else a * keep
        d_a = randn(*a.shape)
        (d_m,) = torch.autograd.grad(a, m, d_a)
        d_m = d_m if keep is None else d_m * keep
        w_t = conv.folded_weight(alpha).flip(2, 3).transpose(0, 1)
        with torch.no_grad():
            got_d = step_kernel.evolve_map(d_a, None, 0.0, keep, conv.taps_of(w_t), None, k, bottom)
        torch.testing.assert_close(got_d, d_m, **tol)
    assert len(map_pass) == 8


def test_one_pass_map_checks_its_inputs(map_pass):
    conv = EAConv(4, 3, True, "linear", "kaiming")
    s = torch.randn(2, 4, 5, 6)
    taps = conv.taps_of(conv.folded_weight(0.5))
    with pytest.raises(ValueError, match=r"prev is \(2, 4, 5, 7\) torch.float32, expected \(2, 4, 5, 6\)"):
        step_kernel.evolve_map(s, torch.randn(2, 4, 5, 7), 0.5, None, taps, None, 3, 2)
    with pytest.raises(ValueError, match="top 3 of kernel 3"):
        step_kernel.evolve_map(s, None, 0.0, None, taps, None, 3, 3)
    with pytest.raises(ValueError, match=r"taps \(12, 8\), expected \(12, 12\)"):
        step_kernel.evolve_map(s, None, 0.0, None, taps[:, :8], None, 3, 2)
    with pytest.raises(ValueError, match="float32 / float64 on the CPU"):
        step_kernel.evolve_map(s.half(), None, 0.0, None, taps, None, 3, 2)


def _module_call(module, q, kv, prev, kpm, attn_mask, qpm, seed):
    """One training call of an EA module: outputs and every gradient."""
    q = q.clone().requires_grad_()
    kv = q if module.self_attention else kv.clone().requires_grad_()
    prev = prev.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with module.evolve(prev, qpm) as link:
        out, _ = module(q, kv, kv, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (out, link.out)]
    torch.autograd.backward([out, link.out], grads)
    conv = module.ea_conv.conv
    return [out, link.out, q.grad, prev.grad, conv.weight.grad, conv.bias.grad] + ([] if kv is q else [kv.grad])


@pytest.mark.parametrize("kind", ["encoder", "decoder", "cross"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_training_call_in_one_pass_equals_the_ops(map_pass, kind, dtype, atol):
    """Forward and backward of one EA call, with every mask there is (padded keys, a
    float attn_mask with values other than 0 / -inf, padded query rows, a query row with
    no key left): the one pass and the PyTorch ops give the same outputs and gradients."""
    from ea_fairseq.modules.evolving_attention import EASpec

    spec = EASpec(alpha=0.7, beta=0.4, kernel_size=3, causal=kind != "encoder", activation="linear",
                  init="kaiming", has_conv=True)
    g = torch.Generator().manual_seed(5)
    bsz, tgt_len, dim = 3, 7, 16
    src_len = 9 if kind == "cross" else tgt_len
    q = torch.randn(tgt_len, bsz, dim, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(src_len, bsz, dim, generator=g, dtype=torch.float64).to(dtype)
    prev = torch.randn(bsz, 4, tgt_len, src_len, generator=g, dtype=torch.float64).to(dtype)
    kpm = torch.zeros(bsz, src_len, dtype=torch.bool)
    kpm[0, -3:] = True
    attn_mask = 0.3 * torch.randn(tgt_len, src_len, generator=g, dtype=torch.float64).to(dtype)
    if kind == "decoder":
        attn_mask = attn_mask.masked_fill(torch.ones(tgt_len, src_len, dtype=torch.bool).triu(1), float("-inf"))
    attn_mask[2, :] = float("-inf")  # a row with no key to attend to
    qpm = torch.zeros(bsz, tgt_len, dtype=torch.bool)
    qpm[1, -2:] = True
    results = []
    for on in (True, False):
        torch.manual_seed(0)
        module = EvolvingMultiheadAttention(dim, 4, ea=spec, self_attention=kind != "cross",
                                            encoder_decoder_attention=kind == "cross").to(dtype)
        with torch.no_grad():
            module.ea_conv.conv.bias.normal_(generator=torch.Generator().manual_seed(2))
        module.one_pass = on
        n = len(map_pass)
        results.append(_module_call(module, q, kv, prev, kpm, attn_mask, qpm, seed=7))
        assert len(map_pass) - n == (2 if on else 0)  # forward and backward
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_training_step_of_a_model_in_one_pass_equals_the_ops(map_pass):
    model = build_model("ea_transformer", LINEAR["cross-kaiming"]).train()
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    grads = {}
    for on in (True, False):
        _set_one_pass(model, on)
        model.zero_grad(set_to_none=True)
        n = len(map_pass)
        full_logits(model, batch).sum().backward()
        assert (len(map_pass) > n) == on
        grads[on] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=0, atol=1e-10, msg=name)
    # scoring without autograd takes it too, with the same logits
    with torch.no_grad():
        n = len(map_pass)
        _set_one_pass(model, True)
        scored = full_logits(model, batch)
        assert len(map_pass) > n
        _set_one_pass(model, False)
        torch.testing.assert_close(scored, full_logits(model, batch), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["gelu", "bfloat16", "autograd"])
def test_maps_outside_the_one_pass_keep_the_ops(map_pass, case):
    """A non-linear activation, half-precision maps and the plain-autograd implementation
    never reach the one pass (it covers linear float32 / float64 maps of the fused path)."""
    extra = LINEAR["cross-kaiming"] + (["--ea-activation", "gelu"] if case == "gelu" else [])
    model = build_model("ea_transformer", extra, dtype=torch.bfloat16 if case == "bfloat16" else torch.float64)
    if case == "autograd":
        for m in model.modules():
            if isinstance(m, EvolvingMultiheadAttention):
                m.impl = "autograd"
    batch = random_batch(model.encoder.dictionary, [6, 3], [5, 4])
    full_logits(model.train(), batch).float().sum().backward()
    assert not map_pass
