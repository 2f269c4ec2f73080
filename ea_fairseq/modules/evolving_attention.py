"""Evolving attention (Wang et al., ICML 2021 / TPAMI 2023) as a fairseq attention module.

One attention *stack* (encoder self-attention, decoder self-attention or decoder
cross-attention) carries its attention map from layer to layer. For layer l > 1,
with raw logits S_l = Q K^T / sqrt(d_head) of shape (B, H, Tq, Tk)::

    M_l = (1 - beta) * S_l + beta * A_{l-1}          # residual link between layers
    C_l = act(Conv2d_l(zero_masked(M_l)))             # heads are the conv's channels
    A_l = alpha * C_l + (1 - alpha) * M_l             # residual link around the conv
    P_l = softmax(A_l + attn_mask)                    # float32, masked keys excluded

and A_1 = S_1. Masked cells (padded keys, future keys, padded query rows) are set
to 0 before the conv and in the map handed on; the mask is applied only for the
softmax. A query row whose keys are all masked gets all-zero probabilities. In
decoder stacks the conv is causal along the query axis (row t sees rows t-k+1..t)
so that no position sees the token it has to predict; along the key axis it is
centred. See ../shared/design/evolving-attention.md.

Memory and speed (training and full forward passes):
* layer 1 of a stack computes its output with ``scaled_dot_product_attention``,
  fairseq's fused kernel, and hands on S_1 (one extra matmul);
* layers l > 1 run ``_EvolvingAttentionFunction``: the forward keeps q, k, v, two
  (B, H, Tq, Tk) maps (the conv's input M_l and, in float32, P_l; in half precision
  A_l instead of P_l), the conv weights, the (small, shared) masks and, with attention
  dropout, a boolean dropout mask. Its hand-written backward runs neither q k^T nor
  the conv forward again, and no layer keeps the map it hands on.
In incremental decoding, a step's new row of the causal conv is one small matmul
(``EAConv.evolve_step``, with the residual around the conv folded into its weights);
on a CPU, the whole step (rows gathered in the beam's order, mix, conv, mask) is one
pass of a small C++ function where it applies (``step_kernel``).
``impl = "autograd"`` (a module attribute) runs the same formulas with plain
autograd and F.conv2d instead: the reference the tests compare against, and the
"before" of ``benchmarks/cost.py``.

Mask polarity follows fairseq: True / 1 = padding (excluded).
"""

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from . import step_kernel

EA_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}
EA_INITS = ("dirac", "kaiming")
EA_IMPLS = ("eager", "fused")  # --ea-attn-impl: the reference, or the fast path

# fairseq's additive masks hold -inf, or -1e8 / -1e4 where its encoder layer turns a
# boolean mask into a float one; anything at or below this counts as "masked" (excluded
# from the softmax and zero in the map). Other float values are added to the logits.
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


def _conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool,
                     need_b: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``F.conv2d(x, weight, bias)`` given ``grad``, the input gradient and
    the weight / bias gradients asked for in two calls. For a conv with as few channels
    as heads, oneDNN's joint backward on a CPU costs about twice the two alone (4 heads,
    a 29 x 4 x 77 x 77 map, one thread: 16.5 ms against 3.7 + 4.2 ms); elsewhere the two
    calls are what the joint one does."""
    args = (grad.contiguous(), x, weight, [weight.size(0)], [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    d_x = d_w = d_b = None
    if need_x:
        d_x = torch.ops.aten.convolution_backward(*args, [True, False, False])[0]
    if need_w or need_b:
        _, d_w, d_b = torch.ops.aten.convolution_backward(*args, [False, need_w, need_b])
    return d_x, d_w, d_b


class _Conv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias)`` with ``_conv2d_backward`` (the plain-autograd path)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        return _conv2d_backward(grad, x, weight, *ctx.needs_input_grad[:3])


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

    def _rows_padding(self) -> Tuple[int, int]:
        """Zero rows above and below the map: causal along queries puts k-1 on top and
        none below, so that output row i covers input rows i-k+1..i; else k//2 each."""
        k, r = self.kernel_size, self.kernel_size // 2
        return (k - 1, 0) if self.causal else (r, r)

    def padded(self, m: Tensor) -> Tensor:
        """The conv's input: m (B, H, Tq, Tk) with its zero padding, (B, H, Tq+k-1, Tk+k-1)."""
        r = self.kernel_size // 2
        return F.pad(m, (r, r, *self._rows_padding()))

    def forward(self, m: Tensor) -> Tensor:
        """m: (B, H, Tq, Tk), zero at masked cells -> (B, H, Tq, Tk)."""
        weight, bias = self.conv.weight, self.conv.bias
        x = self.padded(m)
        if torch.is_grad_enabled() and (m.requires_grad or weight.requires_grad or bias.requires_grad):
            return self._act(_Conv2d.apply(x, weight.to(m.dtype), bias.to(m.dtype)))
        return self.conv_padded(x, weight, bias)

    def conv_padded(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``forward`` from the conv's input as ``padded`` made it (no autograd graph)."""
        return self._act(F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype)))

    def backward(self, grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, need_m: bool, need_w: bool,
                 need_b: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Gradients of ``forward(m)`` with the given weight and bias, given ``grad``
        (B, H, Tq, Tk), for m, weight and bias (None where not needed), without keeping a
        graph. ``x`` is the conv's input, ``padded(m)`` (the attention Function keeps it).

        Both gradients come from the output gradient padded the other way round (along
        queries, the rows the forward puts on top go below): the input gradient is the
        conv of that with the taps flipped and in- and out-channels swapped, and the
        weight gradient is one product per tap of it with x shifted by the tap, both
        read in place on the padded grid. On a CPU, for these 4-channel maps, oneDNN's
        own backward convs take about 1.4 times as long each (29 x 4 x 73 x 77, one
        thread: input 5.4 against 4.0 ms, weights 6.0 against 4.3 ms)."""
        k, r = self.kernel_size, self.kernel_size // 2
        top, bottom = self._rows_padding()
        w = weight.to(x.dtype)
        if self.activation != "linear":  # through the activation, at the recomputed pre-activation
            with torch.enable_grad():
                pre = F.conv2d(x, w, bias.to(x.dtype)).requires_grad_()
                (grad,) = torch.autograd.grad(self._act(pre), pre, grad)
        g = F.pad(grad, (r, r, bottom, top))  # the shape of x
        d_m = F.conv2d(g, w.flip(2, 3).transpose(0, 1)) if need_m else None
        d_w = d_b = None
        if need_w:
            d_w = self.weight_grad(g, x, weight.dtype)
        if need_b:
            d_b = grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)).to(bias.dtype)
        return d_m, d_w, d_b

    def weight_grad(self, g: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The weight gradient (H, H, k, k), in ``dtype``, of the conv from its input ``x``
        (``padded(m)``) and its output gradient ``g`` padded the other way round (the
        shape of x; see ``backward``): one product per tap of g with x shifted by the tap,
        read in place on the padded grid."""
        k, r = self.kernel_size, self.kernel_size // 2
        bottom = self._rows_padding()[1]
        bsz, heads, rows, width = x.shape
        # out[t, s] = sum over taps of w[dy, dx] x[t + dy, s + dx], flattened along
        # (row, key): g's cell (t, s) sits at start + t*width + s, x's (t+dy, s+dx) at
        # off + t*width + s. The last 2r cells of the span are g's zero padding.
        n = (rows - k + 1) * width - 2 * r
        start = bottom * width + r
        g_flat = g.view(bsz, heads, rows * width)[:, :, start: start + n]
        x_flat = x.reshape(bsz, heads, rows * width)
        taps = [torch.bmm(g_flat, x_flat[:, :, dy * width + dx: dy * width + dx + n].transpose(1, 2))
                for dy in range(k) for dx in range(k)]  # each (B, H_out, H_in)
        wide = torch.promote_types(x.dtype, torch.float32)
        return torch.stack(taps, -1).sum(0, dtype=wide).view(heads, heads, k, k).to(dtype)

    def folded_weight(self, alpha: float) -> Tensor:
        """alpha * W with the residual (1 - alpha) M folded in at the tap that reads the
        output's own cell (row ``top`` of the window, the centre key), (H, H, k, k) in at
        least float32, no graph: lerp(M, conv(M), alpha) = conv(M, this) + alpha * bias
        for a linear activation."""
        weight, k = self.conv.weight, self.kernel_size
        wide = torch.promote_types(weight.dtype, torch.float32)
        with torch.no_grad():
            w = weight.to(wide) * alpha
            eye = torch.eye(weight.size(0), dtype=wide, device=w.device)
            w[:, :, self._rows_padding()[0], k // 2] += (1.0 - alpha) * eye
        return w

    @staticmethod
    def taps_of(w: Tensor) -> Tensor:
        """A conv weight (H_out, H_in, k, k) as step_kernel's taps (k*H_out, H_in*k): row
        dx*H_out + o, column c*k + dy."""
        k = w.size(3)
        return w.permute(3, 0, 1, 2).reshape(k * w.size(0), w.size(1) * k)

    def step_window(self, history: Optional[Tensor], new_rows: Tensor,
                    order: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Incremental decoding (causal conv), first half: the conv's input window of one
        step. ``history`` (H, k-1, B', Tk') holds the last k-1 zero-masked rows of M as the
        previous step handed them on (None before the first step; keys that came later
        are zero in them); ``order`` (B,), where given, picks hypothesis ``order[b]`` of
        the history for hypothesis b (a beam search's reorders, applied here rather than
        when they are made, so that the rows are copied once a step); ``new_rows``
        (B, H, Tq, Tk) gives the new rows' shape, dtype and device. Returns the window,
        laid out (H, k-1+Tq, B, Tk+k-1) with its zero padding and the history filled in,
        and the (B, H, Tq, Tk) view of it that the caller fills with the new rows of M
        before ``evolve_step``.

        The (heads, rows, hypotheses, keys) layout makes the step's matmul one product over
        every hypothesis, and lets the caller write M straight into the window."""
        bsz, heads, tgt_len, src_len = new_rows.shape
        k, r = self.kernel_size, self.kernel_size // 2
        rows, width = k - 1 + tgt_len, src_len + 2 * r
        strides = (rows * bsz * width, bsz * width, width, 1)
        # zeroed whole: on a CPU, one memset costs less than zeroing the padding columns
        # alone, which touch nearly every cache line of the window in a strided pattern
        window = new_rows.new_zeros(heads, rows, bsz, width)
        if history is not None:
            into = window.as_strided(history.shape[:2] + (bsz, history.size(3)), strides, r)
            if order is None:
                into.copy_(history)
            elif torch.is_grad_enabled() and history.requires_grad:  # out= takes no autograd
                into.copy_(history.index_select(2, order))
            else:
                torch.index_select(history, 2, order, out=into)
        m_rows = window.as_strided((bsz, heads, tgt_len, src_len), (width, strides[0], strides[1], 1),
                                   (k - 1) * strides[1] + r)
        return window, m_rows

    def evolve_step(self, window: Tensor, alpha: float, taps: Optional[Tuple[Tensor, Tensor]] = None,
                    matmul: bool = True) -> Tuple[Tensor, Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """Incremental decoding, second half: A = lerp(M, act(conv(M)), alpha) for the new
        rows of a ``step_window`` window, once the caller has filled them with M.
        ``taps``: what an earlier step of the same batch returned (None: make them);
        ``matmul=False`` runs F.conv2d over the window instead (the reference path).
        Returns A's new rows (B, H, Tq, Tk), not yet masked, the rows to hand on to the
        next step's ``step_window`` (H, k-1, B, Tk), and the taps to pass to the next
        step (None where the F.conv2d path ran).

        One new row (Tq = 1, each beam-search step) is one small matmul: the kx taps of
        each output channel as rows, applied to the (channel, row) pairs of the window,
        then added along keys with the taps' shifts; with a linear activation, the
        residual around the conv and the bias are folded into the taps (``step_taps``).
        oneDNN's convolution, with the lerp, takes about 2.3 times as long on a CPU for
        these shapes (40 hypotheses, 4 heads, 60 keys: 269 against 116 us a call), and
        builds a new primitive for every key length."""
        heads, rows, bsz, width = window.shape
        k, r = self.kernel_size, self.kernel_size // 2
        tgt_len, src_len = rows - (k - 1), width - 2 * r
        kept = window.as_strided((heads, k - 1, bsz, src_len), window.stride(), tgt_len * bsz * width + r)
        if (not matmul or tgt_len > 1 or self.activation != "linear"
                or (torch.is_grad_enabled() and (self.conv.weight.requires_grad or window.requires_grad))):
            m = window[:, k - 1:, :, r: r + src_len].permute(2, 0, 1, 3)  # (B, H, Tq, Tk)
            weight, bias = self.conv.weight.to(m.dtype), self.conv.bias.to(m.dtype)
            c = self._act(F.conv2d(window.permute(2, 0, 1, 3), weight, bias))
            return torch.lerp(m, c, alpha), kept, None
        taps = self.step_taps(window.dtype, alpha) if taps is None else taps
        z = torch.addmm(taps[1], taps[0], window.view(heads * k, bsz * width))  # (kx*H, B*width)
        # out[b, o, 0, s] = sum over dx of z[dx*H + o, b*width + s + dx]: kx (odd, > 1) shifted
        # views, added; the sum is laid out as they are, (H, B, Tk) in memory
        step = heads * z.stride(0)
        shifted = [z.as_strided((bsz, heads, 1, src_len), (width, z.stride(0), 0, 1), dx * step + dx)
                   for dx in range(k)]
        out = torch.add(shifted[0], shifted[1])
        for s in shifted[2:]:
            out.add_(s)
        return out, kept, taps

    def step_taps(self, dtype: torch.dtype, alpha: float) -> Tuple[Tensor, Tensor]:
        """The conv's weights as evolve_step's matmul takes them, (kx*H, H*ky), with
        alpha and the residual (1 - alpha) M folded in (linear activation), and the bias
        times alpha as the matmul's added column (kx*H, 1), in the rows of the first key
        shift only (the shifted products are summed). Made once per incremental state:
        the weights do not change while a batch is decoded."""
        weight, bias = self.conv.weight, self.conv.bias
        k, heads = self.kernel_size, weight.size(0)
        wide = torch.promote_types(weight.dtype, torch.float32)  # folded in at least float32
        with torch.no_grad():
            w = weight.to(wide) * alpha
            # the current row (the last of the causal window), centred key: M itself
            w[:, :, k - 1, k // 2] += (1.0 - alpha) * torch.eye(heads, dtype=wide, device=w.device)
            taps = w.permute(3, 0, 1, 2).reshape(k * heads, heads * k).to(dtype)
            column = torch.zeros(k * heads, 1, dtype=wide, device=w.device)
            column[:heads, 0] = bias.to(wide) * alpha
            return taps, column.to(dtype)


class MaskInputs(NamedTuple):
    """fairseq's masks of one attention call, as it passes them (None where absent)."""

    key_padding_mask: Optional[Tensor]  # (B, Tk), True / 1 = pad
    attn_mask: Optional[Tensor]  # (Tq, Tk): bool (True = masked) or additive float
    query_padding_mask: Optional[Tensor]  # (B, Tq), True = pad (EA's map rows to zero)


class EAMasks(NamedTuple):
    """The masks of one attention call, each broadcastable to (B, H, Tq, Tk).

    Built from fairseq's small masks (and rebuilt in backward rather than saved), so the
    bytes saved for backward do not grow with depth. The maps are masked by multiplying
    with the float forms (``keep``, ``logit_bias``, ``row_keep``): one pass each, where a
    broadcasting ``masked_fill`` costs several times more on a CPU.
    """

    blocked: Optional[Tensor]  # bool (B|1, 1, Tq|1, Tk): excluded from the softmax
    bias: Optional[Tensor]  # float (1, 1, Tq, Tk): a float attn_mask, added to the logits
    keep: Optional[Tensor]  # map dtype (B|1, 1, Tq|1, Tk|1): 0 where blocked or a padded query row, else 1
    logit_bias: Optional[Tensor]  # softmax dtype: bias, and finfo.min at blocked cells (finite)
    row_keep: Optional[Tensor]  # softmax dtype (B|1, 1, Tq|1, 1): 0 where every key is blocked, else 1

    @staticmethod
    def build(bsz: int, tgt_len: int, src_len: int, key_padding_mask: Optional[Tensor],
              attn_mask: Optional[Tensor], query_padding_mask: Optional[Tensor],
              dtype: torch.dtype = torch.float32) -> "EAMasks":
        """key_padding_mask (B, Tk), True/1 = pad; attn_mask (Tq, Tk), bool (True =
        masked) or additive float (<= -1e4 / -inf = masked, other values added to the
        logits); query_padding_mask (B, Tq), True = pad. ``dtype``: of the maps (the
        softmax runs in it promoted to at least float32)."""
        blocked: Optional[Tensor] = None
        bias: Optional[Tensor] = None
        if key_padding_mask is not None:
            blocked = key_padding_mask.to(torch.bool).view(bsz, 1, 1, src_len)
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError(
                    f"evolving attention takes a 2-D attn_mask (Tq, Tk) shared by the batch, "
                    f"got shape {tuple(attn_mask.shape)}"
                )
            if attn_mask.dtype == torch.bool:
                am = attn_mask
            else:
                am = attn_mask <= _MASKED_BIAS
                bias = attn_mask.view(1, 1, tgt_len, src_len)
            am = am.view(1, 1, tgt_len, src_len)
            blocked = am if blocked is None else blocked | am
        zeroed = blocked
        if query_padding_mask is not None:
            qpad = query_padding_mask.to(torch.bool).view(bsz, 1, tgt_len, 1)
            zeroed = qpad if zeroed is None else zeroed | qpad
        empty_rows = blocked.all(dim=-1, keepdim=True) if blocked is not None else None
        soft_dtype = torch.promote_types(dtype, torch.float32)
        keep = None if zeroed is None else (~zeroed).to(dtype)
        row_keep = None if empty_rows is None else (~empty_rows).to(soft_dtype)
        logit_bias = None if bias is None else bias.to(soft_dtype)
        if blocked is not None:
            # finite, so that a row with every key blocked stays finite (row_keep zeroes it)
            low = torch.finfo(soft_dtype).min
            logit_bias = (blocked.to(soft_dtype) * low if logit_bias is None
                          else logit_bias.masked_fill(blocked, low))
        return EAMasks(blocked, bias, keep, logit_bias, row_keep)


_NO_MASKS = EAMasks(None, None, None, None, None)


def _masked_softmax(a: Tensor, masks: EAMasks) -> Tensor:
    """softmax over keys of A (+ float attn_mask) in float32 (float64 stays float64);
    blocked cells get probability 0, and rows with no unblocked key are all 0."""
    logits = a.to(torch.promote_types(a.dtype, torch.float32))
    if masks.logit_bias is not None:
        logits = logits + masks.logit_bias
    probs = F.softmax(logits, dim=-1)
    if masks.row_keep is not None:
        probs = probs * masks.row_keep
    return probs


def _keeps_probs(a: Tensor, probs: Tensor) -> bool:
    """Whether the attention Function keeps P for backward (else A_l, from which the
    backward makes P again): P where it takes no more bytes than A, that is where the
    maps are float32 or float64; in float16 / bfloat16, P (float32) would take twice A."""
    return probs.dtype == a.dtype


class _EvolvingAttentionFunction(torch.autograd.Function):
    """Layers l > 1 of a stack: (q, k, v, A_{l-1}, conv weights) -> (out, A_l, P_l).

    Saves q, k, v, the conv's input M_l (zero-padded as the conv takes it; none when
    alpha = 0), P_l (or A_l, see ``_keeps_probs``), the conv weights, the small masks'
    inputs and, with attention dropout, the boolean keep-mask: two (B, H, Tq, Tk) maps
    per layer. The backward is written out: neither q k^T nor the conv nor (in float32)
    the softmax is run again, and the map a layer hands on is kept by no one (the next
    layer keeps its own M instead). On a CPU, the map's mix, conv, lerp and mask, and the
    backward's input gradient, each run as one pass of ``step_kernel.evolve_map`` where
    ``_maps_in_one_pass`` says so."""

    @staticmethod
    def forward(ctx, module: "EvolvingMultiheadAttention", mask_inputs: "MaskInputs", q: Tensor, k: Tensor,
                v: Tensor, prev: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]):
        # q: (B*H, Tq, D), pre-scaled; k, v: (B*H, Tk, D); prev: (B, H, Tq, Tk) or None
        masks = module._build_masks(q, k, mask_inputs)
        conv = module.ea_conv
        scores = module._scores(q, k, q.size(0) // module.num_heads)
        x = None  # the conv's input
        ctx.one_pass = conv is not None and module._maps_in_one_pass(scores, prev)
        if ctx.one_pass:  # mix, padding, conv, lerp and mask in one pass; M written into x
            ea, size, r = module.ea, conv.kernel_size, conv.kernel_size // 2
            top = conv._rows_padding()[0]
            bsz, heads, tgt_len, src_len = scores.shape
            x = scores.new_zeros(bsz, heads, tgt_len + size - 1, src_len + 2 * r)
            a = step_kernel.evolve_map(
                scores, prev, ea.beta, masks.keep, conv.taps_of(conv.folded_weight(ea.alpha)),
                bias.detach() * ea.alpha, size, top, m_out=x[:, :, top: top + tgt_len, r: r + src_len])
        elif conv is None:
            a = module._mix(scores, prev, masks.keep)
        else:
            m = module._mix(scores, prev, masks.keep)
            x = conv.padded(m)
            a = torch.lerp(m, conv.conv_padded(x, weight, bias), module.ea.alpha)
            a = a if masks.keep is None else a * masks.keep
        probs = _masked_softmax(a, masks)
        keep = module._dropout_keep_mask(probs)
        dropped = probs if keep is None else probs * keep / (1.0 - module.dropout_module.p)
        assert v.size(0) == q.size(0), "keys/values shared across beams are for incremental decoding only"
        out = torch.bmm(dropped.to(v.dtype).flatten(0, 1), v)  # (B*H, Tq, D)
        ctx.module = module
        ctx.kept_probs = _keeps_probs(a, probs)
        ctx.prev_dtype = None if prev is None else prev.dtype
        # the mask inputs are fairseq's small masks, the same tensors in every layer
        ctx.save_for_backward(q, k, v, x, probs if ctx.kept_probs else a, weight, bias, keep, *mask_inputs)
        ctx.mark_non_differentiable(probs)
        ctx.set_materialize_grads(False)
        return out, a, probs

    @staticmethod
    def backward(ctx, d_out: Optional[Tensor], d_a: Optional[Tensor], _d_probs):
        q, k, v, x, kept, weight, bias, keep, *mask_inputs = ctx.saved_tensors
        module, ea = ctx.module, ctx.module.ea
        conv = module.ea_conv
        masks = module._build_masks(q, k, MaskInputs(*mask_inputs))
        needs = ctx.needs_input_grad  # (module, mask_inputs, q, k, v, prev, weight, bias)
        map_dtype = q.dtype
        d_v = None
        d_map = d_a  # dL/dA_l: from the next layer, plus the softmax's below
        if d_out is not None:
            probs = kept if ctx.kept_probs else _masked_softmax(kept, masks)  # float32 or float64
            if needs[4]:
                dropped = probs if keep is None else probs * keep / (1.0 - module.dropout_module.p)
                d_v = torch.bmm(dropped.to(v.dtype).flatten(0, 1).transpose(1, 2), d_out)  # (B*H, Tk, D)
            d_probs = torch.bmm(d_out, v.transpose(1, 2)).view_as(probs).to(probs.dtype)
            if keep is not None:
                d_probs = d_probs.mul_(keep).div_(1.0 - module.dropout_module.p)
            # rows of P that are all zero (no key to attend to) get a zero gradient, as they should
            d_logits = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype).to(map_dtype)
            d_map = d_logits if d_map is None else d_logits.add_(d_map)
        if d_map is None:
            return (None,) * 8
        keep_map = masks.keep

        def times_keep(c: float):  # keep * c, a small broadcast tensor (or c alone)
            return c if keep_map is None else keep_map * c

        d_w = d_b = None
        masked = False  # whether d_m is keep-masked already
        if conv is None:  # A_l = M_l
            d_m = d_map
        elif ctx.one_pass:  # the same in one pass: the conv with the folded weights transposed
            size, r = conv.kernel_size, conv.kernel_size // 2
            bottom = conv._rows_padding()[1]
            tgt_len, src_len = d_map.shape[2:]
            g = g_rows = None  # keep * d_map, padded as conv.backward pads it (for the weights)
            if needs[6]:
                g = d_map.new_zeros(x.shape)
                g_rows = g[:, :, bottom: bottom + tgt_len, r: r + src_len]
            w_t = conv.folded_weight(ea.alpha).flip(2, 3).transpose(0, 1)
            d_m = step_kernel.evolve_map(d_map, None, 0.0, keep_map, conv.taps_of(w_t), None, size, bottom,
                                         m_out=g_rows)
            masked = True
            wide = torch.promote_types(d_map.dtype, torch.float32)
            if needs[6]:
                d_w = conv.weight_grad(g, x, weight.dtype) * ea.alpha
            if needs[7]:
                kept_grad = g if g is not None else d_map * times_keep(1.0)
                d_b = (kept_grad.sum((0, 2, 3), dtype=wide) * ea.alpha).to(bias.dtype)
        else:  # A_l = lerp(M_l, C_l, alpha) * keep
            d_c = d_map * times_keep(ea.alpha)
            d_m, d_w, d_b = conv.backward(d_c, x, weight, bias, True, needs[6], needs[7])
            if ea.alpha < 1:
                d_m = d_m.add_(d_c, alpha=(1.0 - ea.alpha) / ea.alpha)  # (1 - alpha) * keep * d_map
        # M_l = lerp(S_l, A_{l-1}, beta) * keep
        scaled = (lambda c: c) if masked else times_keep
        d_prev = None
        if ctx.prev_dtype is not None and ea.beta > 0:
            d_prev = (d_m * scaled(ea.beta)).to(ctx.prev_dtype) if needs[5] else None
            d_m = d_m * scaled(1.0 - ea.beta)
        elif keep_map is not None and not masked:
            d_m = d_m * keep_map
        d_s = d_m.flatten(0, 1)  # (B*H, Tq, Tk)
        d_q = torch.bmm(d_s, k) if needs[2] else None
        d_k = torch.bmm(d_s.transpose(1, 2), q) if needs[3] else None
        return None, None, d_q, d_k, d_v, d_prev, d_w, d_b


class _FirstLayerScoresFunction(torch.autograd.Function):
    """Layer 1 of a stack: (q, k) -> S_1 = q k^T, zero at masked cells (B, H, Tq, Tk).

    Saves q and k (which the fused attention keeps as well) and the small mask inputs,
    not a (B, 1, Tq, Tk) mask of its own."""

    @staticmethod
    def forward(ctx, module: "EvolvingMultiheadAttention", mask_inputs: "MaskInputs", q: Tensor, k: Tensor):
        keep = module._build_masks(q, k, mask_inputs).keep
        scores = module._scores(q, k, q.size(0) // module.num_heads)
        if keep is not None:
            scores = scores.mul_(keep)
        ctx.module = module
        ctx.save_for_backward(q, k, *mask_inputs)
        return scores

    @staticmethod
    def backward(ctx, d_scores: Tensor):
        q, k, *mask_inputs = ctx.saved_tensors
        keep = ctx.module._build_masks(q, k, MaskInputs(*mask_inputs)).keep
        if keep is not None:
            d_scores = d_scores * keep
        d_scores = d_scores.flatten(0, 1)  # (B*H, Tq, Tk)
        d_q = torch.bmm(d_scores, k) if ctx.needs_input_grad[2] else None
        d_k = torch.bmm(d_scores.transpose(1, 2), q) if ctx.needs_input_grad[3] else None
        return None, None, d_q, d_k


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
        # straight into __dict__: nn.Module.__setattr__ checks for parameters and modules
        # first, which costs more than the rest of a decoding step's bookkeeping
        self.module.__dict__["_ea_link"] = self
        return self

    def __exit__(self, *exc) -> None:
        self.module.__dict__["_ea_link"] = None


class EvolvingMultiheadAttention(MultiheadAttention):
    """fairseq ``MultiheadAttention`` whose logits evolve along the stack.

    Supports self-attention and encoder-decoder attention, key padding, a 2-D
    ``attn_mask`` (bool, or float: masked at <= -1e4 / -inf, other values added to
    the logits), incremental decoding and beam search. The incremental state keeps,
    besides fairseq's keys and values, the last k-1 zero-masked rows of M (with the
    beam's reorders made since, applied when the next step reads them) and the conv's
    weights as one decoding step takes them under this module's own key
    ("ea_state"). In beam search, cross-attention keys and values are
    computed and kept once per sentence (fairseq's ``set_beam_size`` shortcut) while
    the EA rows stay per hypothesis; a reorder that moves a hypothesis to another
    sentence gives each hypothesis its own copy, so any order stays exact.

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
        self.impl = "autograd" if ea.impl == "eager" else "fused"  # see the module docstring
        # on a CPU, decoding steps and whole maps in one pass (step_kernel) where it applies;
        # False: PyTorch ops throughout
        self.one_pass = True
        self._ea_link: Optional[EALink] = None

    def extra_repr(self) -> str:
        return f"alpha={self.ea.alpha}, beta={self.ea.beta}, causal={self.ea.causal}"

    def evolve(self, prev: Optional[Tensor], query_padding_mask: Optional[Tensor] = None) -> EALink:
        """Context for one call: ``with attn.evolve(prev, qpm) as link: ...; link.out``."""
        return EALink(self, prev, query_padding_mask)

    # -- incremental state -------------------------------------------------------------
    def _shares_kv(self) -> bool:
        return self.encoder_decoder_attention and self.beam_size > 1 and self.impl == "fused"

    def _beam_laid_out(self, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], bsz: int) -> bool:
        """Whether the encoder rows come in groups of ``beam_size`` identical copies (as
        SequenceGenerator lays them out), so that one row per group can stand for all.
        Checked once per batch, when the keys are cached: sharing is exact whatever the
        caller passes, unlike fairseq's shortcut, which assumes it."""
        beam = self.beam_size
        if key.size(1) != bsz or bsz % beam:
            return False
        for t in (key, value) if value is not key else (key,):
            g = t.view(t.size(0), -1, beam, t.size(2))
            if not torch.equal(g, g[:, :, :1].expand_as(g)):
                return False
        if key_padding_mask is not None and key_padding_mask.dim() == 2:
            g = key_padding_mask.view(-1, beam, key_padding_mask.size(1))
            if not torch.equal(g, g[:, :1].expand_as(g)):
                return False
        return True

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Reorder the cached state along the batch (hypothesis) axis; exact for any order.

        Per-hypothesis entries (keys/values of self-attention, EA rows) are reordered.
        Cross-attention keys/values kept once per sentence ("shared_*") follow the
        sentences when every hypothesis stays within its sentence, as in beam search;
        otherwise each hypothesis gets its own copy from then on. The conv's step weights
        ("static_*") are the same for all and stay as they are.
        """
        for key in ("attn_state", "ea_state"):
            buf = self.get_incremental_state(incremental_state, key)
            if buf is None:
                continue
            reordered: Dict[str, Optional[Tensor]] = {}
            shared = [name for name in buf if name.startswith("shared_") and buf[name] is not None]
            if shared:
                beam = self.beam_size
                sent_of = new_order // beam  # the sentence each new hypothesis comes from
                by_sent = sent_of.view(-1, beam) if new_order.numel() % beam == 0 else None
                if by_sent is not None and torch.equal(by_sent, by_sent[:, :1].expand_as(by_sent)):
                    sents = by_sent[:, 0]
                    n_old = buf[shared[0]].size(0)
                    # the usual beam step keeps every sentence in place: nothing to copy
                    # (fairseq's MultiheadAttention skips it the same way)
                    keep = sents.numel() == n_old and torch.equal(sents, torch.arange(n_old, device=sents.device))
                    for name in shared:
                        reordered[name] = buf[name] if keep else buf[name].index_select(0, sents)
                else:
                    for name in shared:  # un-share: one copy per hypothesis from now on
                        reordered["prev_" + name[len("shared_"):]] = buf[name].index_select(0, sent_of)
            for name, value in buf.items():
                if name.startswith("static_"):  # the same for every hypothesis
                    reordered[name] = value
                elif name == "rows":
                    # EA rows: the order is kept, and the next step's window takes them in it
                    # (EAConv.step_window); orders made before that step compose
                    pending = buf.get("rows_order")
                    reordered[name] = value
                    reordered["rows_order"] = new_order if pending is None else pending.index_select(0, new_order)
                elif name != "rows_order" and not name.startswith("shared_"):
                    reordered[name] = None if value is None else value.index_select(0, new_order)
            buf = reordered
            incremental_state = self.set_incremental_state(incremental_state, key, buf)
        return incremental_state

    # -- forward -----------------------------------------------------------------------
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
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """query: (Tq, B, C); key/value: (Tk, B, C_kv). key_padding_mask: (B, Tk),
        True = pad. attn_mask: (Tq, Tk), additive float or bool (True = masked).
        Returns (out (Tq, B, C), weights (B, Tq, Tk) averaged over heads, or
        (H, B, Tq, Tk) with need_head_weights, or None)."""
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, embed_dim = query.size()
        heads, head_dim = self.num_heads, self.head_dim
        link = self._ea_link

        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        cached_kv = saved is not None and static_kv and ("prev_key" in saved or "shared_key" in saved)
        q = self.q_proj(query) * self.scaling
        share = False
        if self.self_attention:
            k, v = self.k_proj(query), self.v_proj(query)
        elif cached_kv:
            k = v = None  # encoder keys/values are cached
        else:
            assert key is not None and value is not None
            share = saved is not None and self._shares_kv() and self._beam_laid_out(key, value, key_padding_mask, bsz)
            if share:
                # the hypotheses of a sentence share its source: one row per sentence
                key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0]  # (Tk, B/beam, C)
                value = value.view(value.size(0), -1, self.beam_size, value.size(2))[:, :, 0]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0]
            k, v = self.k_proj(key), self.v_proj(value)

        q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)  # (B*H, Tq, D)
        if k is not None:
            k = k.contiguous().view(k.size(0), -1, head_dim).transpose(0, 1)  # (B'*H, Tk, D)
            v = v.contiguous().view(v.size(0), -1, head_dim).transpose(0, 1)  # (B'*H, Tk, D)

        if saved is not None:
            tag = "shared_" if share or "shared_key" in saved else "prev_"
            if tag + "key" in saved:
                kv_bsz = saved[tag + "key"].size(0)
                prev_k = saved[tag + "key"].view(kv_bsz * heads, -1, head_dim)  # (B'*H, Tk', D)
                prev_v = saved[tag + "value"].view(kv_bsz * heads, -1, head_dim)
                k = prev_k if static_kv else torch.cat([prev_k, k], dim=1)
                v = prev_v if static_kv else torch.cat([prev_v, v], dim=1)
            kv_bsz = k.size(0) // heads
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved.get(tag + "key_padding_mask"),
                batch_size=kv_bsz,
                src_len=k.size(1),
                static_kv=static_kv,
            )
            saved[tag + "key"] = k.view(kv_bsz, heads, -1, head_dim)  # (B', H, Tk, D)
            saved[tag + "value"] = v.view(kv_bsz, heads, -1, head_dim)
            saved[tag + "key_padding_mask"] = key_padding_mask
            incremental_state = self._set_input_buffer(incremental_state, saved)
        src_len = k.size(1)
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None  # fairseq's stand-in for None under TorchScript
        kv_bsz = k.size(0) // heads
        if kv_bsz != bsz and key_padding_mask is not None:  # one row per sentence -> per hypothesis
            key_padding_mask = key_padding_mask.repeat_interleave(bsz // kv_bsz, dim=0)

        mask_inputs = MaskInputs(key_padding_mask, attn_mask, link.query_padding_mask if link is not None else None)
        masks = self._build_masks(q, k, mask_inputs)
        prev = link.prev if link is not None else None
        if prev is not None and prev.shape != (bsz, heads, tgt_len, src_len):
            raise RuntimeError(
                f"evolving attention: previous map {tuple(prev.shape)} does not match "
                f"this layer's logits {(bsz, heads, tgt_len, src_len)}"
            )

        fused = (self.impl == "fused" and incremental_state is None and not before_softmax
                 and not torch.jit.is_scripting())
        probs: Optional[Tensor] = None
        if fused and self.ea_conv is None and prev is None and not need_weights:
            attn = self._attend_first_layer(q, k, v, masks, bsz)
            evolved = _FirstLayerScoresFunction.apply(self, mask_inputs, q, k)
        elif fused and (torch.is_grad_enabled() or need_weights):
            weight = self.ea_conv.conv.weight if self.ea_conv is not None else None
            bias = self.ea_conv.conv.bias if self.ea_conv is not None else None
            attn, evolved, probs = _EvolvingAttentionFunction.apply(self, mask_inputs, q, k, v, prev, weight,
                                                                             bias)
        else:
            evolved, probs = self._evolve_and_softmax(q, k, prev, masks, incremental_state)
            if before_softmax:
                logits = evolved if masks.bias is None else evolved + masks.bias
                if masks.blocked is not None:
                    logits = logits.masked_fill(masks.blocked, float("-inf"))
                return logits.view(bsz * heads, tgt_len, src_len), v
            attn = self._weighted_values(self.dropout_module(probs.type_as(q)), v, bsz)
        if link is not None:
            link.out = evolved

        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        attn = self.out_proj(attn)

        weights: Optional[Tensor] = None
        if need_weights:
            assert probs is not None
            weights = probs.view(bsz, heads, tgt_len, src_len).transpose(1, 0)  # (H, B, Tq, Tk)
            if not need_head_weights:
                weights = weights.mean(dim=0)  # (B, Tq, Tk)
        return attn, weights

    # -- the pieces ----------------------------------------------------------------------
    def _scores(self, q: Tensor, k: Tensor, bsz: int) -> Tensor:
        """S = q k^T: q (B*H, Tq, D), pre-scaled; k (B'*H, Tk, D), B' = B or B / beam
        (keys kept once per sentence). Returns (B, H, Tq, Tk)."""
        heads, tgt_len = self.num_heads, q.size(1)
        kv_bsz = k.size(0) // heads
        if kv_bsz == bsz:
            return torch.bmm(q, k.transpose(1, 2)).view(bsz, heads, tgt_len, -1)
        # the beam's queries become rows of one product per sentence and head, so that the
        # keys are read in place (a broadcasting matmul would copy them for every hypothesis)
        beam = bsz // kv_bsz
        qs = q.view(kv_bsz, beam, heads, tgt_len, -1).transpose(1, 2).reshape(kv_bsz * heads, beam * tgt_len, -1)
        s = torch.bmm(qs, k.transpose(1, 2))  # (B'*H, beam*Tq, Tk)
        return s.view(kv_bsz, heads, beam, tgt_len, -1).transpose(1, 2).reshape(bsz, heads, tgt_len, -1)

    def _weighted_values(self, probs: Tensor, v: Tensor, bsz: int) -> Tensor:
        """probs (B, H, Tq, Tk) @ v (B'*H, Tk, D) -> (B*H, Tq, D)."""
        heads, tgt_len = self.num_heads, probs.size(2)
        kv_bsz = v.size(0) // heads
        if kv_bsz == bsz:
            return torch.bmm(probs.flatten(0, 1), v)
        beam = bsz // kv_bsz  # as in _scores: values read in place
        ps = probs.view(kv_bsz, beam, heads, tgt_len, -1).transpose(1, 2).reshape(kv_bsz * heads, beam * tgt_len, -1)
        out = torch.bmm(ps, v)  # (B'*H, beam*Tq, D)
        return out.view(kv_bsz, heads, beam, tgt_len, -1).transpose(1, 2).reshape(bsz * heads, tgt_len, -1)

    def _evolve_and_softmax(self, q: Tensor, k: Tensor, prev: Optional[Tensor], masks: EAMasks,
                            incremental_state: IncrementalState) -> Tuple[Tensor, Tensor]:
        """(q, k, A_{l-1}) -> (A_l (B, H, Tq, Tk), zero at masked cells; P_l, float32)."""
        bsz = q.size(0) // self.num_heads
        evolved = self._evolve(self._scores(q, k, bsz), prev, masks.keep, incremental_state)
        return evolved, _masked_softmax(evolved, masks)

    def _dropout_keep_mask(self, probs: Tensor) -> Optional[Tensor]:
        """Boolean keep-mask of attention dropout (None when dropout is off)."""
        p = self.dropout_module.p
        if p <= 0 or not (self.training or self.dropout_module.apply_during_inference):
            return None
        return torch.empty_like(probs, dtype=torch.bool).bernoulli_(1.0 - p)

    def _attend_first_layer(self, q: Tensor, k: Tensor, v: Tensor, masks: EAMasks, bsz: int) -> Tensor:
        """Layer 1 of a stack: fairseq's fused attention (scaled_dot_product_attention).
        q (B*H, Tq, D), pre-scaled; k, v (B*H, Tk, D). Returns out (B*H, Tq, D)."""
        heads, tgt_len, head_dim = self.num_heads, q.size(1), q.size(2)
        sdpa_mask: Optional[Tensor] = None
        if masks.bias is not None:
            sdpa_mask = masks.bias if masks.blocked is None else masks.bias.masked_fill(masks.blocked, float("-inf"))
        elif masks.blocked is not None:
            sdpa_mask = ~masks.blocked  # True = take part
        dropout = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
        out = F.scaled_dot_product_attention(
            q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, -1, head_dim),
            v.view(bsz, heads, -1, head_dim), attn_mask=sdpa_mask, dropout_p=dropout, scale=1.0,
        )  # (B, H, Tq, D)
        if masks.row_keep is not None:
            out = out * masks.row_keep.to(out.dtype)  # rows with no key to attend to
        return out.flatten(0, 1)

    def _build_masks(self, q: Tensor, k: Tensor, inputs: MaskInputs) -> EAMasks:
        if inputs.key_padding_mask is None and inputs.attn_mask is None and inputs.query_padding_mask is None:
            return _NO_MASKS  # each decoding step of an unpadded batch
        heads = self.num_heads
        return EAMasks.build(q.size(0) // heads, q.size(1), k.size(1), *inputs, dtype=q.dtype)

    def _mix(self, logits: Tensor, prev: Optional[Tensor], keep: Optional[Tensor],
             out: Optional[Tensor] = None) -> Tensor:
        """M_l = (1 - beta) S_l + beta A_{l-1}, zero where ``keep`` is 0 (S_l where there is
        no previous map); written into ``out`` where given (a decoding step's window)."""
        mixes = prev is not None and self.ea.beta > 0
        if mixes and prev.dtype != logits.dtype:
            prev = prev.to(logits.dtype)
        if out is None or torch.is_grad_enabled():  # autograd: make M, then copy it in
            m = torch.lerp(logits, prev, self.ea.beta) if mixes else logits
            m = m if keep is None else m * keep
            return m if out is None else out.copy_(m)
        if mixes:
            torch.lerp(logits, prev, self.ea.beta, out=out)
        else:
            out.copy_(logits)
        return out if keep is None else out.mul_(keep)

    def _steps_in_one_pass(self, logits: Tensor, prev: Optional[Tensor]) -> bool:
        """Whether this decoding step runs as ``step_kernel.step`` (one pass on a CPU)
        rather than as PyTorch ops: the same cases as ``EAConv.evolve_step``'s matmul,
        on a CPU in float32 / float64, where the library is built."""
        conv = self.ea_conv
        grad = torch.is_grad_enabled() and (
            logits.requires_grad or conv.conv.weight.requires_grad or conv.conv.bias.requires_grad
            or (prev is not None and prev.requires_grad))
        return (self.impl == "fused" and self.one_pass and conv.activation == "linear" and not grad
                and (prev is None or prev.dtype == logits.dtype) and step_kernel.applies(logits))

    def _maps_in_one_pass(self, logits: Tensor, prev: Optional[Tensor]) -> bool:
        """Whether a whole map's mix, conv, lerp and mask run as ``step_kernel.evolve_map``
        (one pass on a CPU; training's forward and backward, and scoring without autograd)
        rather than as PyTorch ops: a linear activation, float32 / float64 maps (prev as
        well), where the library is built. The caller keeps autograd out (the attention
        Function, or no gradient)."""
        return (self.impl == "fused" and self.one_pass and self.ea_conv.activation == "linear"
                and (prev is None or prev.dtype == logits.dtype) and step_kernel.map_applies(logits))

    def _evolve(self, logits: Tensor, prev: Optional[Tensor], keep: Optional[Tensor],
                incremental_state: IncrementalState) -> Tensor:
        """S_l (B, H, Tq, Tk) -> A_l (same shape, zero where ``keep`` (EAMasks.keep) is 0)."""
        ea = self.ea
        if self.ea_conv is None:
            return self._mix(logits, prev, keep)

        if incremental_state is not None and ea.causal and ea.kernel_size > 1:
            buf = self.get_incremental_state(incremental_state, "ea_state") or {}
            taps = (buf["static_taps"], buf["static_bias"]) if "static_taps" in buf else None
            # rows: (H, k-1, B', Tk') or None (zero rows above the first one), with the
            # beam's reorders since they were made
            if self._steps_in_one_pass(logits, prev):
                if taps is None:
                    taps = self.ea_conv.step_taps(logits.dtype, ea.alpha)
                a, kept = step_kernel.step(logits, prev, ea.beta, keep, buf.get("rows"), buf.get("rows_order"),
                                           taps[0], taps[1], ea.kernel_size)
                keep = None  # applied
            else:  # M goes straight into the conv's window
                window, m_rows = self.ea_conv.step_window(buf.get("rows"), logits, buf.get("rows_order"))
                self._mix(logits, prev, keep, out=m_rows)
                a, kept, taps = self.ea_conv.evolve_step(window, ea.alpha, taps, matmul=self.impl == "fused")
            state: Dict[str, Optional[Tensor]] = {"rows": kept}
            if taps is not None:
                state["static_taps"], state["static_bias"] = taps
            self.set_incremental_state(incremental_state, "ea_state", state)
        elif self._maps_in_one_pass(logits, prev) and not (torch.is_grad_enabled() and (
                logits.requires_grad or (prev is not None and prev.requires_grad)
                or any(p.requires_grad for p in self.ea_conv.parameters()))):
            conv, top = self.ea_conv, self.ea_conv._rows_padding()[0]
            a = step_kernel.evolve_map(logits, prev, ea.beta, keep, conv.taps_of(conv.folded_weight(ea.alpha)),
                                       conv.conv.bias.detach() * ea.alpha, ea.kernel_size, top)
            keep = None  # applied
        else:
            m = self._mix(logits, prev, keep)
            a = torch.lerp(m, self.ea_conv(m), ea.alpha)  # alpha C + (1-alpha) M
        if keep is not None:
            a = a * keep
        return a
