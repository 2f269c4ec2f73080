"""Evolving attention (Wang et al., ICML 2021 / TPAMI 2023) as a fairseq attention module.

An attention *stack* (encoder self-attention, decoder self-attention or decoder cross-
attention) hands its attention map on from layer to layer. For layer l, with the logits
S_l = Q_l K_l^T / sqrt(d_head) of shape (B, H, Tq, Tk)::

    M_l = (1 - beta) * S_l + beta * A_{l-1}            # M_1 = S_1
    A_l = alpha * act(conv_l(M_l)) + (1 - alpha) * M_l  # A_l = M_l in a layer without a conv
    P_l = softmax(A_l + attn_mask)                      # in float32 (float64 stays float64)
    out = dropout(P_l) V_l

conv_l is a k x k convolution with the H heads as its channels (own weights per layer).
Masked cells (padded keys, future keys, padded query rows) are zero in M_l, so the conv
never reads them, and take no part in the softmax; a query row whose keys are all masked
gets all-zero probabilities. In decoder stacks the conv is causal along queries (output
row t reads rows t-k+1..t), so no position sees the token it has to predict; along keys it
is centred. Mask polarity follows fairseq: True / 1 = padding or excluded.

Two implementations of these equations, chosen by ``EASpec.impl`` (``--ea-attn-impl``):

* ``eager``, the reference: the lines in ``EvolvingMultiheadAttention.forward`` under
  "eager", in PyTorch ops differentiated by autograd (it keeps S, M, C, A and P per layer).
* ``fused``, the default: the same maths with less memory. Layer 1 of a stack attends with
  ``F.scaled_dot_product_attention`` and hands on S_1; later layers run
  ``_EvolvingAttention``, whose backward is written out, so that it keeps for backward two
  maps per layer: the conv's input and P_l (A_l in half precision).

Both decode with the same step (``EAConv.step``: the new rows' conv over a window of the
k-1 rows above them, kept in the incremental state).

The map handed to the next layer (A_l) is exact at unmasked cells and finite elsewhere:
the next layer zeroes the masked cells of its M. Outputs at padded query rows are not
defined (as in fairseq), and the two implementations may differ there.
"""

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

EA_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}
EA_INITS = ("dirac", "kaiming")
EA_IMPLS = ("eager", "fused")  # see the module docstring

# fairseq's additive masks hold -inf, or -1e8 / -1e4 where its encoder layer turns a boolean
# mask into a float one: a cell at or below this is masked; other values are added to A_l.
_MASKED_BIAS = -1e4

IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]


@dataclass(frozen=True)
class EASpec:
    """Evolving-attention settings of one attention module (one layer of one stack)."""

    alpha: float  # weight of the conv branch, in [0, 1]
    beta: float  # weight of the previous layer's map, in [0, 1]
    kernel_size: int  # odd, >= 1
    causal: bool  # conv causal along the query axis (decoder stacks)
    activation: str  # key of EA_ACTIVATIONS
    init: str  # one of EA_INITS
    has_conv: bool  # False in layer 1 of a stack (nothing to evolve from) or when alpha == 0
    impl: str = "fused"  # one of EA_IMPLS


class EAOutput(NamedTuple):
    out: Tensor  # (Tq, B, C), as fairseq's MultiheadAttention returns it
    weights: Optional[Tensor]  # (B, Tq, Tk) head average, (H, B, Tq, Tk) per head, or None
    map: Tensor  # A_l (B, H, Tq, Tk), for the next layer of the stack


class EAConv(nn.Module):
    """act(k x k conv) over an attention map, heads as channels: (B, H, Tq, Tk) -> the same.

    Zero padding: k-1 rows on top (``causal``: output row t reads rows t-k+1..t) or k//2 on
    both sides along queries; k//2 on both sides along keys.
    """

    def __init__(self, heads: int, kernel_size: int, causal: bool, activation: str, init: str):
        super().__init__()
        self.kernel_size, self.causal, self.activation = kernel_size, causal, activation
        self.act = EA_ACTIVATIONS[activation]
        self.conv = nn.Conv2d(heads, heads, kernel_size)
        if init == "dirac":  # the identity: with a linear activation, A_l = M_l at the start
            nn.init.dirac_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, activation={self.activation}"

    def pad(self, m: Tensor) -> Tensor:
        """The conv's input: m (B, H, Tq, Tk) zero-padded to (B, H, Tq+k-1, Tk+k-1)."""
        k, r = self.kernel_size, self.kernel_size // 2
        return F.pad(m, (r, r, k - 1, 0) if self.causal else (r, r, r, r))

    def unpad(self, x: Tensor) -> Tensor:
        """The cells of m in a tensor shaped like ``pad(m)``."""
        k, r = self.kernel_size, self.kernel_size // 2
        top = k - 1 if self.causal else r
        return x[:, :, top: x.size(2) - (k - 1 - top), r: x.size(3) - r]

    def forward(self, m: Tensor) -> Tensor:
        """act(conv(M)) for m (B, H, Tq, Tk), zero at masked cells."""
        return self.act(F.conv2d(self.pad(m), self.conv.weight.to(m.dtype), self.conv.bias.to(m.dtype)))

    def step(self, m: Tensor, rows: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Decoding (causal conv): act(conv(M)) for the new rows m (B, H, Tq, Tk) of M, given
        ``rows`` (B, H, k-1, Tk'), the k-1 rows of M above them as the last step handed them
        on (None before the first step; Tk' <= Tk: keys that came later are zero in them).
        Returns that (B, H, Tq, Tk) and the last k-1 rows for the next step (B, H, k-1, Tk)."""
        k, r = self.kernel_size, self.kernel_size // 2
        if rows is None:
            x = F.pad(m, (0, 0, k - 1, 0))
        else:
            x = torch.cat([F.pad(rows, (0, m.size(3) - rows.size(3))), m], 2)
        c = self.act(F.conv2d(x, self.conv.weight.to(m.dtype), self.conv.bias.to(m.dtype), padding=(0, r)))
        return c, x[:, :, x.size(2) - (k - 1):]


class EAMasks(NamedTuple):
    """The masks of one attention call, each broadcastable to (B, H, Tq, Tk), None where
    nothing is masked. Small: made from fairseq's (B, Tk), (Tq, Tk) and (B, Tq) masks."""

    keep: Optional[Tensor]  # map dtype: 0 at masked cells and padded query rows, else 1
    bias: Optional[Tensor]  # softmax dtype: added to A_l; the float attn_mask, finfo.min where masked
    row_keep: Optional[Tensor]  # softmax dtype (.., Tq, 1): 0 for query rows with no key left
    sdpa: Optional[Tensor]  # scaled_dot_product_attention's mask: bool (True = attend) or additive

    @staticmethod
    def build(bsz: int, tgt_len: int, src_len: int, key_padding_mask: Optional[Tensor],
              attn_mask: Optional[Tensor], query_padding_mask: Optional[Tensor], dtype: torch.dtype) -> "EAMasks":
        """key_padding_mask (B, Tk), True / 1 = pad; attn_mask (Tq, Tk), bool (True = masked)
        or additive float (masked at <= -1e4); query_padding_mask (B, Tq), True = pad;
        ``dtype``: the maps' (the softmax runs in it promoted to at least float32)."""
        blocked = None if key_padding_mask is None else key_padding_mask.to(torch.bool).view(bsz, 1, 1, src_len)
        added = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError(f"evolving attention takes a 2-D attn_mask (Tq, Tk), got {tuple(attn_mask.shape)}")
            if attn_mask.dtype != torch.bool:
                added = attn_mask.view(1, 1, tgt_len, src_len)
                attn_mask = attn_mask <= _MASKED_BIAS
            am = attn_mask.view(1, 1, tgt_len, src_len)
            blocked = am if blocked is None else blocked | am
        zeroed = blocked
        if query_padding_mask is not None:
            pad_rows = query_padding_mask.to(torch.bool).view(bsz, 1, tgt_len, 1)
            zeroed = pad_rows if zeroed is None else zeroed | pad_rows
        if zeroed is None:
            return _NO_MASKS
        if blocked is None:
            return EAMasks((~zeroed).to(dtype), None, None, None)
        soft = torch.promote_types(dtype, torch.float32)
        low = torch.finfo(soft).min  # finite, so that a row with every key masked stays finite
        bias = blocked.to(soft) * low if added is None else added.to(soft).masked_fill(blocked, low)
        sdpa = ~blocked if added is None else added.to(dtype).masked_fill(blocked, float("-inf"))
        row_keep = (~blocked.all(-1, keepdim=True)).to(soft)
        return EAMasks((~zeroed).to(dtype), bias, row_keep, sdpa)


_NO_MASKS = EAMasks(None, None, None, None)


def _mix(s: Tensor, prev: Optional[Tensor], beta: float, keep: Optional[Tensor]) -> Tensor:
    """M = (1 - beta) S + beta A_prev (S where there is no previous map), zero where keep is 0."""
    m = s if prev is None or beta == 0 else torch.lerp(s, prev.to(s.dtype), beta)
    return m if keep is None else m * keep


def _softmax(a: Tensor, masks: EAMasks) -> Tensor:
    """P = softmax over keys of A + bias, in at least float32; rows with no key left are 0."""
    logits = a.to(torch.promote_types(a.dtype, torch.float32))
    probs = F.softmax(logits if masks.bias is None else logits + masks.bias, dim=-1)
    return probs if masks.row_keep is None else probs * masks.row_keep


def _keeps_probs(a: Tensor, probs: Tensor) -> bool:
    """Whether _EvolvingAttention keeps P for backward (else A, from which backward makes P
    again): where P takes no more bytes than A, that is unless the maps are half precision."""
    return probs.dtype == a.dtype


def _dropped(probs: Tensor, keep: Optional[Tensor], rate: float) -> Tensor:
    """Attention dropout with a given boolean keep-mask (None: no dropout)."""
    return probs if keep is None else probs * keep / (1.0 - rate)


def _beam_rows(x: Tensor, groups: int) -> Tensor:
    """(B, H, T, X) -> (B', H, (B/B')*T, X), B' = ``groups``: the hypotheses of one sentence
    as the rows of one product with the sentence's keys, which are kept once (beam search)."""
    bsz, heads, rows, cols = x.shape
    return x.view(groups, bsz // groups, heads, rows, cols).transpose(1, 2).reshape(groups, heads, -1, cols)


def _unbeam_rows(y: Tensor, bsz: int) -> Tensor:
    """The inverse of ``_beam_rows``: (B', H, (B/B')*T, X) -> (B, H, T, X)."""
    groups, heads, _, cols = y.shape
    return y.view(groups, heads, bsz // groups, -1, cols).transpose(1, 2).reshape(bsz, heads, -1, cols)


class _EvolvingAttention(torch.autograd.Function):
    """The fused path's layers l > 1 (or any layer asked for its weights), full passes:
    (q, k, v, A_{l-1}, conv weight, conv bias) -> (out, A_l, P_l) as the eager path computes
    them. Keeps for backward q, k, v, the conv's input pad(M_l) (nothing without a conv), P_l
    (or A_l where the maps are half precision: P_l in float32 would take twice the bytes),
    the boolean dropout mask and fairseq's small masks; the backward computes neither q k^T
    nor (for a linear activation) the conv again."""

    @staticmethod
    def forward(ctx, module: "EvolvingMultiheadAttention", masks: EAMasks, mask_inputs: Tuple[Optional[Tensor], ...],
                q: Tensor, k: Tensor, v: Tensor, prev: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor]):
        # q: (B, H, Tq, D), pre-scaled; k, v: (B, H, Tk, D); prev: (B, H, Tq, Tk) or None;
        # masks: EAMasks of mask_inputs (fairseq's small masks, from which backward makes them again)
        ea, conv = module.ea, module.ea_conv
        m = _mix(q @ k.transpose(2, 3), prev, ea.beta, masks.keep)
        x = None  # the conv's input, pad(M)
        if conv is None:
            a = m
        else:
            x = conv.pad(m)
            a = torch.lerp(m, conv.act(F.conv2d(x, weight.to(m.dtype), bias.to(m.dtype))), ea.alpha)
        probs = _softmax(a, masks)
        drop = module.dropout_mask(probs)
        out = _dropped(probs, drop, module.dropout_module.p).to(v.dtype) @ v  # (B, H, Tq, D)
        ctx.module, ctx.prev_dtype = module, None if prev is None else prev.dtype
        ctx.kept_probs = _keeps_probs(a, probs)
        ctx.save_for_backward(q, k, v, x, probs if ctx.kept_probs else a, weight, bias, drop, *mask_inputs)
        ctx.mark_non_differentiable(probs)
        ctx.set_materialize_grads(False)
        return out, a, probs

    @staticmethod
    def backward(ctx, d_out: Optional[Tensor], d_a: Optional[Tensor], _d_probs: Optional[Tensor]):
        q, k, v, x, kept, weight, bias, drop, *mask_inputs = ctx.saved_tensors
        module = ctx.module
        ea, conv, rate = module.ea, module.ea_conv, module.dropout_module.p
        needs = ctx.needs_input_grad[3:]  # (q, k, v, prev, weight, bias)
        masks = module.masks(q, k, mask_inputs)
        d_map, d_v = d_a, None  # dL/dA_l: from the next layer, plus through the softmax below
        if d_out is not None:
            probs = kept if ctx.kept_probs else _softmax(kept, masks)
            if needs[2]:
                d_v = _dropped(probs, drop, rate).to(v.dtype).transpose(2, 3) @ d_out
            d_probs = _dropped((d_out @ v.transpose(2, 3)).to(probs.dtype), drop, rate)
            d_logits = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype).to(q.dtype)
            d_map = d_logits if d_map is None else d_logits + d_map
        if d_map is None:
            return (None,) * 9
        d_w = d_b = None
        if conv is None:  # A = M
            d_m = d_map
        else:  # A = lerp(M, act(conv(pad(M))), alpha)
            w = weight.to(x.dtype)
            d_c = d_map * ea.alpha
            if conv.activation != "linear":  # through the activation, at its recomputed input
                with torch.enable_grad():
                    pre = F.conv2d(x, w, bias.to(x.dtype)).requires_grad_()
                    (d_c,) = torch.autograd.grad(conv.act(pre), pre, d_c)
            d_m = conv.unpad(torch.nn.grad.conv2d_input(x.shape, w, d_c))
            d_m = d_m if ea.alpha == 1 else d_m.add_(d_map, alpha=1.0 - ea.alpha)
            if needs[4]:
                d_w = torch.nn.grad.conv2d_weight(x, w.shape, d_c).to(weight.dtype)
            if needs[5]:
                d_b = d_c.sum((0, 2, 3), dtype=torch.promote_types(d_c.dtype, torch.float32)).to(bias.dtype)
        if masks.keep is not None:  # M = lerp(S, A_{l-1}, beta) * keep
            d_m = d_m * masks.keep
        d_prev = None
        if ctx.prev_dtype is not None and ea.beta > 0:
            d_prev = (d_m * ea.beta).to(ctx.prev_dtype) if needs[3] else None
            d_m = d_m * (1.0 - ea.beta)
        d_q = d_m @ k if needs[0] else None
        d_k = d_m.transpose(2, 3) @ q if needs[1] else None
        return None, None, None, d_q, d_k, d_v, d_prev, d_w, d_b


class EvolvingMultiheadAttention(MultiheadAttention):
    """fairseq ``MultiheadAttention`` whose map evolves along its stack.

    Self-attention or encoder-decoder attention; key padding, a 2-D ``attn_mask`` (bool, or
    float: masked at <= -1e4, other values added to A_l), incremental decoding and beam
    search. ``forward`` takes fairseq's arguments plus the previous layer's map and the query
    padding mask, and returns ``EAOutput(out, weights, map)``. Keys and values are kept in
    fairseq's incremental state as fairseq keeps them (and reordered by fairseq's code,
    including its ``set_beam_size`` shortcut that keeps cross-attention keys once per
    sentence); a causal conv keeps the last k-1 rows of M per hypothesis under "ea_state",
    (B, H, k-1, Tk).
    Rewrites the attention of fairseq/modules/multihead_attention.py (0.12.2,
    ``MultiheadAttention.forward``) and reuses its projections and state helpers.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, ea: EASpec, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)
        if self.use_xformers:
            raise ValueError("evolving attention needs explicit logits: it cannot run on xFormers attention")
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("evolving attention does not support add_bias_kv / add_zero_attn")
        if not (self.self_attention or self.encoder_decoder_attention):
            raise ValueError("evolving attention is self-attention or encoder-decoder attention")
        if ea.impl not in EA_IMPLS:
            raise ValueError(f"--ea-attn-impl must be one of {', '.join(EA_IMPLS)}, got {ea.impl!r}")
        self.ea = ea
        self.ea_conv = EAConv(num_heads, ea.kernel_size, ea.causal, ea.activation, ea.init) if ea.has_conv else None

    def extra_repr(self) -> str:
        return f"alpha={self.ea.alpha}, beta={self.ea.beta}, causal={self.ea.causal}, impl={self.ea.impl}"

    def masks(self, q: Tensor, k: Tensor, mask_inputs: Tuple[Optional[Tensor], ...]) -> EAMasks:
        """``EAMasks`` for q (B, H, Tq, D), k (B, H, Tk, D) and fairseq's masks
        (key_padding_mask, attn_mask, query_padding_mask)."""
        return EAMasks.build(q.size(0), q.size(2), k.size(2), *mask_inputs, dtype=q.dtype)

    def dropout_mask(self, probs: Tensor) -> Optional[Tensor]:
        """The boolean keep-mask of attention dropout for ``probs``, None where it is off."""
        rate = self.dropout_module.p
        if rate <= 0 or not (self.training or self.dropout_module.apply_during_inference):
            return None
        return torch.empty_like(probs, dtype=torch.bool).bernoulli_(1.0 - rate)

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: IncrementalState = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
        ea_prev: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
    ) -> EAOutput:
        """query (Tq, B, C); key, value (Tk, B, C_kv); key_padding_mask (B, Tk), True = pad;
        attn_mask (Tq, Tk); ea_prev: A_{l-1} (B, H, Tq, Tk), None in layer 1;
        query_padding_mask (B, Tq), True = pad (rows of M set to zero)."""
        if before_softmax:
            raise ValueError("evolving attention does not return raw logits (before_softmax)")
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, embed_dim = query.shape
        q, k, v, key_padding_mask = self._project(query, key, value, key_padding_mask, incremental_state, static_kv)
        src_len = k.size(2)
        if ea_prev is not None and ea_prev.shape != (bsz, self.num_heads, tgt_len, src_len):
            raise ValueError(f"evolving attention: the previous map {tuple(ea_prev.shape)} does not match this "
                             f"layer's {(bsz, self.num_heads, tgt_len, src_len)}")
        if key_padding_mask is not None and key_padding_mask.size(0) != bsz:  # keys kept once per sentence
            key_padding_mask = key_padding_mask.repeat_interleave(bsz // key_padding_mask.size(0), dim=0)
        mask_inputs = (key_padding_mask, attn_mask, query_padding_mask)
        masks = EAMasks.build(bsz, tgt_len, src_len, *mask_inputs, dtype=q.dtype)

        if self.ea.impl == "fused" and incremental_state is None:
            out, a, probs = self._fused(q, k, v, ea_prev, masks, mask_inputs, need_weights)
        else:  # eager: the equations as written, with autograd
            m = _mix(self._scores(q, k), ea_prev, self.ea.beta, masks.keep)  # (B, H, Tq, Tk)
            a = self._evolve(m, incremental_state)
            a = a if masks.keep is None else a * masks.keep
            probs = _softmax(a, masks)
            out = self._values(_dropped(probs, self.dropout_mask(probs), self.dropout_module.p).to(v.dtype), v)

        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim))
        weights: Optional[Tensor] = None
        if need_weights:
            weights = probs.transpose(0, 1)  # (H, B, Tq, Tk)
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return EAOutput(out, weights, a)

    def _project(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], incremental_state: IncrementalState, static_kv: bool):
        """q (B, H, Tq, D), pre-scaled, and k, v (B', H, Tk, D) with their key padding mask
        (B', Tk), through fairseq's incremental state ("prev_key" etc., laid out as fairseq's
        module keeps them). B' = B / beam where cross-attention keeps the encoder's keys once
        per sentence (fairseq's ``set_beam_size`` shortcut, only while decoding)."""
        bsz = query.size(1)
        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        if self.self_attention:
            key = value = query
        elif saved is not None and static_kv and "prev_key" in saved:
            key = value = None  # cached
        elif saved is not None and self.beam_size > 1 and key.size(1) == bsz:
            key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0]  # (Tk, B', C)
            value = value.view(value.size(0), -1, self.beam_size, value.size(2))[:, :, 0]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0]
        q = self._heads(self.q_proj(query) * self.scaling)
        k = v = None
        if key is not None:
            k, v = self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if saved is not None:
            if "prev_key" in saved:
                if static_kv:
                    k, v = saved["prev_key"], saved["prev_value"]
                else:
                    k, v = torch.cat([saved["prev_key"], k], 2), torch.cat([saved["prev_value"], v], 2)
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask, saved.get("prev_key_padding_mask"), k.size(0), k.size(2), static_kv)
            saved.update(prev_key=k, prev_value=v, prev_key_padding_mask=key_padding_mask)
            self._set_input_buffer(incremental_state, saved)
        return q, k, v, key_padding_mask

    def _heads(self, x: Tensor) -> Tensor:
        """(T, B, H*D) -> (B, H, T, D)."""
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    @staticmethod
    def _scores(q: Tensor, k: Tensor) -> Tensor:
        """q k^T: q (B, H, Tq, D), k (B', H, Tk, D) -> (B, H, Tq, Tk)."""
        if k.size(0) == q.size(0):
            return q @ k.transpose(2, 3)
        return _unbeam_rows(_beam_rows(q, k.size(0)) @ k.transpose(2, 3), q.size(0))

    @staticmethod
    def _values(probs: Tensor, v: Tensor) -> Tensor:
        """P V: probs (B, H, Tq, Tk), v (B', H, Tk, D) -> (B, H, Tq, D)."""
        if v.size(0) == probs.size(0):
            return probs @ v
        return _unbeam_rows(_beam_rows(probs, v.size(0)) @ v, probs.size(0))

    def _evolve(self, m: Tensor, incremental_state: IncrementalState) -> Tensor:
        """A = lerp(M, act(conv(M)), alpha) (M where there is no conv). While decoding with a
        causal conv, the rows above M's come from the incremental state, which then keeps
        the last k-1 rows for the next step (reordered with the beam)."""
        conv = self.ea_conv
        if conv is None:
            return m
        if incremental_state is None or not conv.causal or conv.kernel_size == 1:
            return torch.lerp(m, conv(m), self.ea.alpha)
        state = self.get_incremental_state(incremental_state, "ea_state")
        c, rows = conv.step(m, None if state is None else state["rows"])
        self.set_incremental_state(incremental_state, "ea_state", {"rows": rows})
        return torch.lerp(m, c, self.ea.alpha)

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, prev: Optional[Tensor], masks: EAMasks,
               mask_inputs: Tuple[Optional[Tensor], ...], need_weights: bool):
        """Full passes of the fused path: (out (B, H, Tq, D), A_l, P_l or None)."""
        if prev is None and self.ea_conv is None and not need_weights:  # layer 1: A_1 = S_1
            training = self.training or self.dropout_module.apply_during_inference
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.sdpa, scale=1.0,
                                                 dropout_p=self.dropout_module.p if training else 0.0)
            if masks.row_keep is not None:  # rows with no key to attend to
                out = out * masks.row_keep.to(out.dtype)
            return out, q @ k.transpose(2, 3), None
        weight = bias = None
        if self.ea_conv is not None:
            weight, bias = self.ea_conv.conv.weight, self.ea_conv.conv.bias
        return _EvolvingAttention.apply(self, masks, mask_inputs, q, k, v, prev, weight, bias)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """fairseq's reorder of the keys and values, and the EA rows per hypothesis."""
        incremental_state = super().reorder_incremental_state(incremental_state, new_order)
        state = self.get_incremental_state(incremental_state, "ea_state")
        if state is not None:
            self.set_incremental_state(incremental_state, "ea_state", {"rows": state["rows"].index_select(0, new_order)})
        return incremental_state
