"""The memory-saving attention path (``impl = "fused"``: fused attention in layer 1,
a recomputing autograd Function in layers > 1) against the plain-autograd path:
the same outputs and gradients, and fewer bytes saved for backward."""

import pytest
import torch
from helpers import EA_ALL, build_model, full_logits, make_dictionary, random_batch

from ea_fairseq.modules import EvolvingMultiheadAttention

CONFIGS = {
    "all-stacks": EA_ALL,
    "k5-gelu": EA_ALL + ["--ea-kernel-size", "5", "--ea-activation", "gelu"],
    "defaults+cross": ["--ea-cross-attn"],
    "attention-dropout": EA_ALL + ["--attention-dropout", "0.2"],
}


def _set_impl(model, impl):
    for m in model.modules():
        if isinstance(m, EvolvingMultiheadAttention):
            m.impl = impl


def _loss_and_grads(model, batch, impl):
    _set_impl(model, impl)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same attention-dropout draws in both paths
    out = full_logits(model, batch)
    keep = batch["prev_output_tokens"].ne(model.decoder.dictionary.pad())
    out = out[keep]  # padded positions are unused, and may differ between paths
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_path_equals_plain_autograd(name):
    model = build_model("ea_transformer", CONFIGS[name]).train()
    batch = random_batch(model.encoder.dictionary, [6, 9, 3, 7], [5, 8, 2, 6])
    out_ref, grads_ref = _loss_and_grads(model, batch, "autograd")
    out, grads = _loss_and_grads(model, batch, "fused")
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=0, atol=1e-9, msg=n)


def _saved(model, batch):
    """The tensors autograd saves for backward in one forward pass, one per storage."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_logits(model, batch).sum()
    return list(seen.values())


def _saved_bytes(model, batch):
    return sum(t.untyped_storage().nbytes() for t in _saved(model, batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_saves_two_maps_per_evolving_layer(dtype):
    """Layers > 1 keep two (B, H, Tq, Tk) maps each: the conv's input M (zero-padded as
    the conv takes it: k-1 more rows and k-1 more keys) and P in
    float32 or, in half precision, A (the maps' own dtype); layer 1 keeps none. That is
    far fewer bytes than plain autograd keeps."""
    d = make_dictionary()
    batch = random_batch(d, [30, 28, 25], [29, 27, 20])
    ea = build_model("ea_transformer", ["--ea-cross-attn"], dictionary=d, dtype=dtype).train()
    _set_impl(ea, "autograd")
    plain = _saved_bytes(ea, batch)
    _set_impl(ea, "fused")
    saved = _saved(ea, batch)
    B, H, S, T = 3, 4, 30, 29
    maps = sorted((tuple(t.shape), t.dtype) for t in saved if t.dim() == 4 and t.shape[:2] == (B, H)
                  and t.size(-1) >= T)  # not q, k, v, nor (B, H, Tq, head_dim) attention outputs
    soft = torch.float32 if dtype == torch.float32 else dtype  # P, or A in half precision
    # layers 2..3 of each stack: encoder (S x S), decoder (T x T), cross (T x S)
    expected = 2 * [((B, H, S + 2, S + 2), dtype), ((B, H, S, S), soft), ((B, H, T + 2, T + 2), dtype),
                    ((B, H, T, T), soft), ((B, H, T + 2, S + 2), dtype), ((B, H, T, S), soft)]
    assert maps == sorted(expected)
    fused = sum(t.untyped_storage().nbytes() for t in saved)
    two_maps = sum(torch.Size(shape).numel() * torch.finfo(dt).bits // 8 for shape, dt in expected)
    # without the Function, autograd keeps four or more maps in each of these layers
    assert fused < plain - two_maps, (plain, fused, two_maps)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_conv_with_split_backward_equals_conv2d(causal, kernel, dtype, tol):
    """EAConv under autograd (input and weight gradients asked for separately) and its
    hand-written ``backward`` give F.conv2d's output and gradients; a map without grad
    takes plain F.conv2d."""
    import torch.nn.functional as F

    from ea_fairseq.modules.evolving_attention import EAConv

    torch.manual_seed(0)
    conv = EAConv(4, kernel, causal, "linear", "kaiming").to(dtype)
    m = torch.randn(3, 4, 7, 9, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 4, 7, 9, dtype=dtype)
    out = conv(m)
    out.backward(grad)
    got = (out.detach(), m.grad, conv.conv.weight.grad, conv.conv.bias.grad)

    r = kernel // 2
    m_ref = m.detach().clone().requires_grad_()
    w_ref = conv.conv.weight.detach().clone().requires_grad_()
    b_ref = conv.conv.bias.detach().clone().requires_grad_()
    x = F.pad(m_ref, (r, r, kernel - 1, 0)) if causal else F.pad(m_ref, (r, r, r, r))
    ref = F.conv2d(x, w_ref, b_ref)
    ref.backward(grad)
    for a, b in zip(got, (ref.detach(), m_ref.grad, w_ref.grad, b_ref.grad)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    # the attention Function's backward: from the padded input, no graph
    weight, bias = conv.conv.weight.detach(), conv.conv.bias.detach()
    for need in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        hand = conv.backward(grad, conv.padded(m.detach()), weight, bias, *need)
        for got_grad, ref_grad, needed in zip(hand, (m_ref.grad, w_ref.grad, b_ref.grad), need):
            if not needed:
                assert got_grad is None
                continue
            assert got_grad.dtype == ref_grad.dtype and got_grad.shape == ref_grad.shape
            torch.testing.assert_close(got_grad, ref_grad, rtol=tol, atol=tol * max(1.0, ref_grad.abs().max().item()))
    # only the weights need a gradient (a first layer's map is a leaf without grad)
    conv.zero_grad()
    conv(m.detach()).backward(grad)
    torch.testing.assert_close(conv.conv.weight.grad, w_ref.grad, rtol=tol, atol=tol * w_ref.grad.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(conv(m), ref.detach(), rtol=tol, atol=tol)


def _module_grads(mod, impl, x, prev, kpm, attn_mask, qpm, cross):
    mod.impl = impl
    mod.zero_grad(set_to_none=True)
    x.grad = prev.grad = None
    torch.manual_seed(0)  # the same attention-dropout draws in both paths
    mem = x[: x.size(0) - 2] if cross else x
    with mod.evolve(prev, qpm) as link:
        out, _ = mod(x, mem, mem, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    # weights on both outputs, so that the gradient reaches A_l from the softmax and from
    # the next layer; zero on padded query rows, whose outputs nothing uses
    w_out = torch.randn_like(out) * (~qpm).T.unsqueeze(-1)
    w_map = torch.randn_like(link.out)
    ((out * w_out).sum() + (link.out * w_map).sum()).backward()
    grads = {"x": x.grad, "prev": prev.grad}
    grads.update({n: p.grad for n, p in mod.named_parameters()})
    return out.detach(), link.out.detach(), grads


@pytest.mark.parametrize("activation", ["linear", "relu", "leaky_relu", "gelu", "tanh"])
@pytest.mark.parametrize("causal,cross", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("alpha,beta,kernel", [(0.6, 0.5, 3), (1.0, 0.0, 5), (0.0, 0.7, 3), (0.3, 1.0, 1)])
@pytest.mark.parametrize("variant", ["keeps-probs", "remakes-probs", "dropout", "frozen-conv"])
def test_hand_written_backward_equals_autograd(activation, causal, cross, alpha, beta, kernel, variant, monkeypatch):
    """The Function of layers > 1 (its backward written out, keeping P, or A to make P
    from as in half precision) gives plain autograd's outputs and gradients, float64,
    for every activation, causal or not, self- or cross-attention, masks of every kind,
    attention dropout, and conv weights that are not trained."""
    from ea_fairseq.modules import EASpec, evolving_attention

    if variant == "remakes-probs":
        monkeypatch.setattr(evolving_attention, "_keeps_probs", lambda a, probs: False)

    torch.manual_seed(1)
    spec = EASpec(alpha=alpha, beta=beta, kernel_size=kernel, causal=causal, activation=activation,
                  init="kaiming", has_conv=alpha > 0)
    kind = {"encoder_decoder_attention": True} if cross else {"self_attention": True}
    dropout = 0.3 if variant == "dropout" else 0.0
    mod = EvolvingMultiheadAttention(16, 4, ea=spec, dropout=dropout, **kind).double().train()
    if variant == "frozen-conv" and mod.ea_conv is not None:
        mod.ea_conv.requires_grad_(False)
    T, B = 7, 3
    S = T - 2 if cross else T
    x = torch.randn(T, B, 16, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -2:] = True
    qpm = torch.zeros(B, T, dtype=torch.bool)
    qpm[2, -3:] = True
    attn_mask = torch.triu(torch.full((T, S), float("-inf"), dtype=torch.float64), 1) if causal else None
    if attn_mask is not None:
        attn_mask[3, 1] = 0.25  # a float mask value that is added to the logits
    zeroed = kpm.view(B, 1, 1, S) | qpm.view(B, 1, T, 1)
    if attn_mask is not None:
        zeroed = zeroed | attn_mask.isinf()
    prev = torch.randn(B, 4, T, S, dtype=torch.float64).masked_fill(zeroed, 0.0).requires_grad_()
    ref = _module_grads(mod, "autograd", x, prev, kpm, attn_mask, qpm, cross)
    got = _module_grads(mod, "fused", x, prev, kpm, attn_mask, qpm, cross)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12)
    assert set(got[2]) == set(ref[2])
    for n, g in ref[2].items():
        assert (got[2][n] is None) == (g is None), n
        if g is not None:
            torch.testing.assert_close(got[2][n], g, rtol=0, atol=1e-10, msg=n)
