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


def _saved_bytes(model, batch):
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_logits(model, batch).sum()
    return sum(seen.values())


def test_fused_path_saves_at_most_one_map_per_evolving_layer():
    d = make_dictionary()
    batch = random_batch(d, [30, 28, 25], [29, 27, 20])
    vanilla = build_model("transformer", [], dictionary=d, dtype=torch.float32).train()
    ea = build_model("ea_transformer", ["--ea-cross-attn"], dictionary=d, dtype=torch.float32).train()
    base = _saved_bytes(vanilla, batch)
    _set_impl(ea, "autograd")
    plain = _saved_bytes(ea, batch)
    _set_impl(ea, "fused")
    fused = _saved_bytes(ea, batch)
    B, H, S, T = 3, 4, 30, 29
    # layers 2..3 of each stack keep A_{l-1}: 2 encoder (S x S), 2 decoder (T x T), 2 cross (T x S)
    one_map_each = 4 * B * H * 2 * (S * S + T * T + T * S)
    assert fused - base <= one_map_each * 1.1, (base, plain, fused)
    assert fused < plain - one_map_each, (base, plain, fused)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_conv_with_split_backward_equals_conv2d(causal, kernel, dtype, tol):
    """EAConv's backward (input and weight gradients asked for separately) gives
    F.conv2d's output and gradients; a map without grad takes plain F.conv2d."""
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
    # only the weights need a gradient (a first layer's map is a leaf without grad)
    conv.zero_grad()
    conv(m.detach()).backward(grad)
    torch.testing.assert_close(conv.conv.weight.grad, w_ref.grad, rtol=tol, atol=tol * w_ref.grad.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(conv(m), ref.detach(), rtol=tol, atol=tol)
