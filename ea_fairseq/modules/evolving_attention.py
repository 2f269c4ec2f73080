"""Evolving attention (Wang et al., ICML 2021 / TPAMI 2023) as a fairseq attention module.

One attention *stack* (encoder self-attention, decoder self-attention or decoder
cross-attention) carries its attention map from layer to layer. For layer l > 1,
with raw logits S_l = Q K^T / sqrt(d_head) of shape (B, H, Tq, Tk)::

    M_l = (1 - beta) * S_l + beta * A_{l-1}          # residual link between layers
    C_l = act(Conv2d_l(zero_masked(M_l)))             # heads are the conv's channels
    A_l = alpha * C_l + (1 - alpha) * M_l             # residual link around the conv
    P_l = softmax(A_l + mask_bias)                    # float32

and A_1 = S_1. Masked cells (padded keys, future keys, padded query rows) are set
to 0 before the conv and in the map handed on; the -inf mask is applied only for
the softmax. In decoder stacks the conv is causal along the query axis (row t sees
rows t-k+1..t) so that no position sees the token it has to predict; along the key
axis it is centred. See ../shared/design/evolving-attention.md.

Mask polarity follows fairseq: True / 1 = padding (excluded).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

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

# fairseq's additive masks hold -inf, or -1e8 / -1e4 where its encoder layer turns a
# boolean mask into a float one; anything at or below this counts as "masked".
_MASKED_BIAS = -1e4


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


class EAConv(nn.Module):
    """k x k convolution over an attention map, heads as channels.

    Maps (B, H, Tq, Tk) to (B, H, Tq, Tk). Symmetric ("same") padding, or causal along
    the query axis: output row i sees input rows i-k+1..i; keys are always centred.
    """

    def __init__(self, heads: int, kernel_size: int, causal: bool, activation: str, init: str):
        super().__init__()
        self.kernel_size = kernel_size
        self.causal = causal
        self.activation = activation
        self.conv = nn.Conv2d(heads, heads, kernel_size, padding=0)
        self._act = EA_ACTIVATIONS[activation]
        if init == "dirac":
            # identity at the start: with a linear activation A_l == M_l
            nn.init.dirac_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        # "kaiming": keep nn.Conv2d's own (kaiming-uniform) initialisation

    def extra_repr(self) -> str:
        return f"causal={self.causal}, activation={self.activation}"

    def forward(self, m: Tensor) -> Tensor:
        """m: (B, H, Tq, Tk), zero at masked cells -> (B, H, Tq, Tk)."""
        k, r = self.kernel_size, self.kernel_size // 2
        if self.causal:
            # pad k-1 rows on both sides and keep the first Tq output rows:
            # output row i then covers input rows i-k+1..i
            out = F.conv2d(m, self.conv.weight, self.conv.bias, padding=(k - 1, r))[:, :, : m.size(2)]
        else:
            out = F.conv2d(m, self.conv.weight, self.conv.bias, padding=(r, r))
        return self._act(out)

    def forward_window(self, window: Tensor) -> Tensor:
        """Incremental decoding: window (B, H, k-1+Tq, Tk) = the k-1 zero-masked rows
        above the new rows, then the new rows. Returns the new rows' output (B, H, Tq, Tk)."""
        out = F.conv2d(window, self.conv.weight, self.conv.bias, padding=(0, self.kernel_size // 2))
        return self._act(out)


class EALink:
    """What one attention call takes from, and hands back to, the stack's chain.

    The owning layer opens it around its own forward (``with attn.evolve(...)``), so
    the previous map is an explicit argument of the layer (activation checkpointing
    and FSDP see it) while fairseq's layer code stays unchanged.
    """

    __slots__ = ("module", "prev", "query_padding_mask", "out")

    def __init__(self, module: "EvolvingMultiheadAttention", prev: Optional[Tensor],
                 query_padding_mask: Optional[Tensor]):
        self.module = module
        self.prev = prev  # A_{l-1}: (B, H, Tq, Tk), zero at masked cells; None in layer 1
        self.query_padding_mask = query_padding_mask  # (B, Tq), True = padding
        self.out: Optional[Tensor] = None  # A_l, written by the attention call

    def __enter__(self) -> "EALink":
        if self.module._ea_link is not None:
            raise RuntimeError("evolving attention module entered twice (re-entrant layer call?)")
        self.module._ea_link = self
        return self

    def __exit__(self, *exc) -> None:
        self.module._ea_link = None


class EvolvingMultiheadAttention(MultiheadAttention):
    """fairseq ``MultiheadAttention`` whose logits evolve along the stack.

    Always computes the logits explicitly (never fairseq's fused fast path, which
    hides them). Supports self-attention and encoder-decoder attention, key padding,
    an additive/boolean ``attn_mask`` (treated as binary), incremental decoding and
    beam reordering. The incremental state keeps, besides fairseq's keys and values,
    the last k-1 zero-masked rows of M under this module's own key ("ea_state").

    Rewrites the attention path of fairseq/modules/multihead_attention.py (0.12.2,
    ``MultiheadAttention.forward``, non-fused branch) and reuses its projections,
    dropout and incremental-state helpers.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, ea: EASpec, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)
        if self.use_xformers:
            raise ValueError("evolving attention needs explicit logits: it cannot run on xFormers attention")
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("evolving attention does not support add_bias_kv / add_zero_attn")
        if not (self.self_attention or self.encoder_decoder_attention):
            raise ValueError("evolving attention is self-attention or encoder-decoder attention")
        self.ea = ea
        self.ea_conv = (
            EAConv(num_heads, ea.kernel_size, ea.causal, ea.activation, ea.init) if ea.has_conv else None
        )
        self._ea_link: Optional[EALink] = None

    def extra_repr(self) -> str:
        return f"alpha={self.ea.alpha}, beta={self.ea.beta}, causal={self.ea.causal}"

    def evolve(self, prev: Optional[Tensor], query_padding_mask: Optional[Tensor] = None) -> EALink:
        """Context for one call: ``with attn.evolve(prev, qpm) as link: ...; link.out``."""
        return EALink(self, prev, query_padding_mask)

    def set_beam_size(self, beam_size: int) -> None:
        # fairseq's shortcut shares cross-attention keys across the beams of a
        # sentence; the evolving maps are per hypothesis, so keep beam_size = 1.
        pass

    # -- incremental state -------------------------------------------------------------
    def _get_ea_history(self, incremental_state) -> Optional[Tensor]:
        buf = self.get_incremental_state(incremental_state, "ea_state")
        return None if buf is None else buf.get("rows")

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Reorder cached keys/values/masks and EA rows along the batch (beam) axis.

        Unlike fairseq's version this is right for any permutation: nothing is
        shared between hypotheses here (see ``set_beam_size``).
        """
        for key in ("attn_state", "ea_state"):
            buf = self.get_incremental_state(incremental_state, key)
            if buf is None:
                continue
            for name, value in buf.items():
                if value is not None:
                    buf[name] = value.index_select(0, new_order)
            incremental_state = self.set_incremental_state(incremental_state, key, buf)
        return incremental_state

    # -- forward -----------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """query: (Tq, B, C); key/value: (Tk, B, C_kv). key_padding_mask: (B, Tk),
        True = pad. attn_mask: (Tq, Tk), additive (-inf = masked) or bool (True =
        masked). Returns (out (Tq, B, C), weights (B, Tq, Tk) averaged over heads, or
        (H, B, Tq, Tk) with need_head_weights, or None)."""
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, embed_dim = query.size()
        heads, head_dim = self.num_heads, self.head_dim
        link = self._ea_link

        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        q = self.q_proj(query) * self.scaling
        if self.self_attention:
            k, v = self.k_proj(query), self.v_proj(query)
        elif saved is not None and static_kv and "prev_key" in saved:
            k = v = None  # encoder keys/values are cached
        else:
            assert key is not None and value is not None
            k, v = self.k_proj(key), self.v_proj(value)

        q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)  # (B*H, Tq, D)
        if k is not None:
            k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)  # (B*H, Tk, D)
            v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)  # (B*H, Tk, D)

        if saved is not None:
            if "prev_key" in saved:
                prev_k = saved["prev_key"].view(bsz * heads, -1, head_dim)  # (B*H, Tk', D)
                prev_v = saved["prev_value"].view(bsz * heads, -1, head_dim)
                k = prev_k if static_kv else torch.cat([prev_k, k], dim=1)
                v = prev_v if static_kv else torch.cat([prev_v, v], dim=1)
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved.get("prev_key_padding_mask"),
                batch_size=bsz,
                src_len=k.size(1),
                static_kv=static_kv,
            )
            saved["prev_key"] = k.view(bsz, heads, -1, head_dim)  # (B, H, Tk, D)
            saved["prev_value"] = v.view(bsz, heads, -1, head_dim)
            saved["prev_key_padding_mask"] = key_padding_mask
            incremental_state = self._set_input_buffer(incremental_state, saved)
        src_len = k.size(1)
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None  # fairseq's stand-in for None under TorchScript

        logits = torch.bmm(q, k.transpose(1, 2)).view(bsz, heads, tgt_len, src_len)  # S: (B, H, Tq, Tk)

        # cells excluded from the softmax (B|1, 1, Tq|1, Tk), and those also zeroed in
        # the map (plus padded query rows)
        blocked: Optional[Tensor] = None
        if key_padding_mask is not None:
            blocked = key_padding_mask.to(torch.bool).view(bsz, 1, 1, src_len)
        if attn_mask is not None:
            am = attn_mask if attn_mask.dtype == torch.bool else attn_mask <= _MASKED_BIAS
            am = am.view(1, 1, tgt_len, src_len)
            blocked = am if blocked is None else blocked | am
        zeroed = blocked
        if link is not None and link.query_padding_mask is not None:
            qpad = link.query_padding_mask.to(torch.bool).view(bsz, 1, tgt_len, 1)
            zeroed = qpad if zeroed is None else zeroed | qpad

        prev = link.prev if link is not None else None
        evolved = self._evolve(logits, prev, zeroed, incremental_state)  # A_l: (B, H, Tq, Tk)
        if link is not None:
            link.out = evolved
        if blocked is not None:
            logits = evolved.masked_fill(blocked, float("-inf"))
        else:
            logits = evolved

        logits = logits.view(bsz * heads, tgt_len, src_len)
        if before_softmax:
            return logits, v

        # float32 for half-precision logits (and float64 ones stay float64)
        probs_float = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        probs = self.dropout_module(probs_float.type_as(logits))
        attn = torch.bmm(probs, v)  # (B*H, Tq, D)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        attn = self.out_proj(attn)

        weights: Optional[Tensor] = None
        if need_weights:
            weights = probs_float.view(bsz, heads, tgt_len, src_len).transpose(1, 0)  # (H, B, Tq, Tk)
            if not need_head_weights:
                weights = weights.mean(dim=0)  # (B, Tq, Tk)
        return attn, weights

    def _evolve(self, logits: Tensor, prev: Optional[Tensor], zeroed: Optional[Tensor],
                incremental_state) -> Tensor:
        """S_l (B, H, Tq, Tk) -> A_l (same shape, zero at ``zeroed`` cells)."""
        ea = self.ea
        if prev is not None and ea.beta > 0:
            if prev.shape != logits.shape:
                raise RuntimeError(
                    f"evolving attention: previous map {tuple(prev.shape)} does not match "
                    f"this layer's logits {tuple(logits.shape)}"
                )
            m = torch.lerp(logits, prev.to(logits.dtype), ea.beta)  # (1-beta) S + beta A_{l-1}
        else:
            m = logits
        if zeroed is not None:
            m = m.masked_fill(zeroed, 0.0)
        if self.ea_conv is None:
            return m

        k = ea.kernel_size
        if incremental_state is not None and ea.causal and k > 1:
            bsz, heads, _, src_len = m.shape
            history = self._get_ea_history(incremental_state)  # (B, H, k-1, Tk')
            if history is None:
                history = m.new_zeros(bsz, heads, k - 1, src_len)  # above the first row
            elif history.size(-1) < src_len:
                # keys that were in the future when those rows were made: zeros
                history = F.pad(history, (0, src_len - history.size(-1)))
            window = torch.cat([history, m], dim=2)  # (B, H, k-1+Tq, Tk)
            self.set_incremental_state(incremental_state, "ea_state", {"rows": window[:, :, -(k - 1):]})
            c = self.ea_conv.forward_window(window)
        else:
            c = self.ea_conv(m)
        a = torch.lerp(m, c, ea.alpha)  # alpha C + (1-alpha) M
        if zeroed is not None:
            a = a.masked_fill(zeroed, 0.0)
        return a
