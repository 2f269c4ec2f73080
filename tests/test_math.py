"""EvolvingMultiheadAttention against a naive re-computation of the formulas in
../shared/design/evolving-attention.md (loops, no shared code with the module)."""

import math

import pytest
import torch

from ea_fairseq.modules import EASpec, EvolvingMultiheadAttention


def _reference_stack(modules, x, key_pad, causal, query_pad):
    """Explicit loops over the evolving-attention formulas for a stack of
    self-attention modules all fed the same input x (T, B, C)."""
    T, B, C = x.shape
    outs, maps = [], []
    prev = None
    for mod in modules:
        H, D, ea = mod.num_heads, mod.head_dim, mod.ea
        q = (x @ mod.q_proj.weight.T + mod.q_proj.bias).view(T, B, H, D)
        k = (x @ mod.k_proj.weight.T + mod.k_proj.bias).view(T, B, H, D)
        v = (x @ mod.v_proj.weight.T + mod.v_proj.bias).view(T, B, H, D)
        S = torch.zeros(B, H, T, T, dtype=x.dtype)
        for b in range(B):
            for h in range(H):
                for i in range(T):
                    for j in range(T):
                        S[b, h, i, j] = (q[i, b, h] * k[j, b, h]).sum() / math.sqrt(D)

        def masked(b, i, j):  # excluded from the softmax
            return bool(key_pad[b, j]) or (causal and j > i)

        def zeroed(b, i, j):
            return masked(b, i, j) or bool(query_pad[b, i])

        M = S.clone() if prev is None else (1 - ea.beta) * S + ea.beta * prev
        for b in range(B):
            for i in range(T):
                for j in range(T):
                    if zeroed(b, i, j):
                        M[b, :, i, j] = 0
        if mod.ea_conv is None:
            A = M
        else:
            W, bias, K = mod.ea_conv.conv.weight, mod.ea_conv.conv.bias, ea.kernel_size
            r = K // 2
            row_off = K - 1 if causal else r  # causal: rows i-K+1..i; else centred
            Cv = torch.zeros_like(M)
            for b in range(B):
                for o in range(H):
                    for i in range(T):
                        for j in range(T):
                            acc = bias[o].clone()
                            for c in range(H):
                                for di in range(K):
                                    for dj in range(K):
                                        ii, jj = i + di - row_off, j + dj - r
                                        if 0 <= ii < T and 0 <= jj < T:
                                            acc = acc + W[o, c, di, dj] * M[b, c, ii, jj]
                            Cv[b, o, i, j] = acc
            Cv = torch.nn.functional.leaky_relu(Cv)
            A = ea.alpha * Cv + (1 - ea.alpha) * M
            for b in range(B):
                for i in range(T):
                    for j in range(T):
                        if zeroed(b, i, j):
                            A[b, :, i, j] = 0
        logits = A.clone()
        for b in range(B):
            for i in range(T):
                for j in range(T):
                    if masked(b, i, j):
                        logits[b, :, i, j] = -math.inf
        P = torch.softmax(logits, dim=-1)  # (B, H, T, T)
        o = torch.einsum("bhij,jbhd->ibhd", P, v).reshape(T, B, C)
        outs.append(o @ mod.out_proj.weight.T + mod.out_proj.bias)
        maps.append(A)
        prev = A
    return outs, maps


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_stack_matches_the_formulas(causal, kernel, impl):
    torch.manual_seed(0)
    T, B, C, H = 6, 2, 8, 2
    modules = []
    for layer in range(3):
        spec = EASpec(alpha=0.7, beta=0.3, kernel_size=kernel, causal=causal, activation="leaky_relu",
                      init="kaiming", has_conv=layer > 0, impl=impl)
        modules.append(EvolvingMultiheadAttention(C, H, ea=spec, self_attention=True).double().eval())
    x = torch.randn(T, B, C, dtype=torch.float64)
    key_pad = torch.tensor([[True, True, False, False, False, False], [False] * T])  # left-padded
    query_pad = key_pad
    attn_mask = torch.triu(torch.full((T, T), -math.inf, dtype=torch.float64), 1) if causal else None

    want_out, want_maps = _reference_stack(modules, x, key_pad, causal, query_pad)
    keep = ~key_pad[:, None, None, :] & ~query_pad[:, None, :, None]  # where the maps are defined
    if causal:
        keep = keep & ~attn_mask.isinf()
    prev = None
    for mod, w_out, w_map in zip(modules, want_out, want_maps):
        out, _, prev = mod(x, x, x, key_padding_mask=key_pad, attn_mask=attn_mask, need_weights=False,
                           ea_prev=prev, query_padding_mask=query_pad)
        real = ~key_pad.t()  # (T, B): outputs at padded positions are not used
        torch.testing.assert_close(out[real], w_out[real], rtol=0, atol=1e-12)
        torch.testing.assert_close(prev * keep, w_map, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("grows", [True, False], ids=["self", "cross"])
def test_decoding_step_equals_the_causal_conv_over_the_whole_map(activation, kernel, grows):
    """One new row at a time (then two or three), with the rows it hands on from step to
    step (keys growing with the rows as in self-attention, or fixed as in cross-attention),
    EAConv gives the rows of act(causal conv(M)) over the whole map, written out with loops."""
    from ea_fairseq.modules.evolving_attention import EA_ACTIVATIONS, EAConv

    torch.manual_seed(0)
    B, H, T = 2, 3, 7
    conv = EAConv(H, kernel, True, activation, "kaiming").double()
    with torch.no_grad():
        conv.conv.bias.normal_()
    m = torch.randn(B, H, T, T, dtype=torch.float64)
    if grows:
        m = m.tril()  # future keys are zero in M
    w, b, r = conv.conv.weight.detach(), conv.conv.bias.detach(), kernel // 2
    want = torch.empty_like(m)
    for i in range(T):
        for j in range(T):
            c = b.expand(B, H).clone()
            for dy in range(kernel):
                for dx in range(kernel):
                    y, x = i - (kernel - 1) + dy, j - r + dx
                    if 0 <= y < T and 0 <= x < T:
                        c += m[:, :, y, x] @ w[:, :, dy, dx].T  # (B, H_in) -> (B, H_out)
            want[:, :, i, j] = EA_ACTIVATIONS[activation](c)
    with torch.no_grad():
        rows = None
        for i in range(T):
            width = i + 1 if grows else T
            new = m[:, :, i: i + 1, :width]
            got, rows = conv.step(new, rows)
            assert got.shape == (B, H, 1, width) and rows.shape == (B, H, kernel - 1, width)
            torch.testing.assert_close(got, want[:, :, i: i + 1, :width], rtol=0, atol=1e-12)
        rows, start = None, 0
        for chunk in (2, 3, 2):  # several new rows in one step
            width = start + chunk if grows else T
            got, rows = conv.step(m[:, :, start: start + chunk, :width], rows)
            torch.testing.assert_close(got, want[:, :, start: start + chunk, :width], rtol=0, atol=1e-12)
            start += chunk
