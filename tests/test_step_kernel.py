"""EA's one-pass decoding step on a CPU (ea_fairseq/modules/step_kernel.py and
ea_fairseq/csrc/ea_step.cpp): the same numbers as the reference conv it stands in for,
whole decodes and beam searches unchanged, autograd never bypassed, a bad beam order
stopped, and a clear fallback where the library cannot be built."""

import itertools
import logging

import pytest
import torch
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
    conv = EAConv(heads, k, True, "linear", "kaiming").to(dtype)
    with torch.no_grad():
        conv.conv.bias.normal_(generator=g)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

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
            m.one_pass_steps = on


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
