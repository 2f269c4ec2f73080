"""fairseq Transformer layers whose attention modules evolve along their stack.

The layers keep fairseq's own forward code; they only (a) build
``EvolvingMultiheadAttention`` through fairseq's ``build_*_attention`` hooks and
(b) take the previous layer's maps as explicit arguments and return this layer's
maps, opening an ``EALink`` around fairseq's forward.
"""

from contextlib import nullcontext
from typing import Dict, List, NamedTuple, Optional

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor, nn

from .evolving_attention import EASpec, EvolvingMultiheadAttention

# Parameters fairseq 0.12.2's encoder layer creates for its fused "BetterTransformer"
# inference path (copies of q/k/v/out/fc weights, filled only at checkpoint load).
# That path bypasses the layer's attention module, so EA layers never take it and do
# not keep these parameters (they would be unused in training: DDP rejects that).
_BT_PARAMS = (
    "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
    "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
)


class EATransformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq encoder layer (cfg-based) with evolving self-attention.

    ``ea`` is None for a layer of a stack with EA switched off: it then behaves as
    fairseq's layer (minus the BetterTransformer path and its parameters).
    """

    def __init__(self, cfg, ea: Optional[EASpec], return_fc: bool = False):
        self.ea_spec = ea  # read by build_self_attention during super().__init__
        super().__init__(cfg, return_fc=return_fc)
        self.can_use_fastpath = False
        for name in _BT_PARAMS:
            delattr(self, name)

    def build_self_attention(self, embed_dim: int, cfg):
        if self.ea_spec is None:
            return super().build_self_attention(embed_dim, cfg)
        if cfg.encoder.xformers_att_config is not None:
            raise ValueError("--encoder-xformers-att-config cannot be combined with evolving attention")
        return EvolvingMultiheadAttention(
            embed_dim,
            cfg.encoder.attention_heads,
            ea=self.ea_spec,
            dropout=cfg.attention_dropout,
            self_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fairseq's override adds the BetterTransformer copies; this layer has none
        # (and checkpoints of fairseq's own transformer may carry them).
        for name in _BT_PARAMS:
            state_dict.pop(prefix + name, None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        x: Tensor,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
        ea_prev: Optional[Tensor] = None,
    ):
        """x: (T, B, C); encoder_padding_mask: (B, T), True = pad; ea_prev: A_{l-1}
        (B, H, T, T) or None.

        Returns (out, ea_map): ``out`` as fairseq's layer returns it (x, or
        (x, fc_result) with return_fc) and this layer's map A_l (None if EA is off).
        """
        if not isinstance(self.self_attn, EvolvingMultiheadAttention):
            return super().forward(x, encoder_padding_mask, attn_mask), None
        with self.self_attn.evolve(ea_prev, encoder_padding_mask) as link:
            out = super().forward(x, encoder_padding_mask, attn_mask)
        return out, link.out


_NO_LINK = nullcontext()  # stands in for a stack's link where its attention is not evolving


class EADecoderLayerOutput(NamedTuple):
    x: Tensor  # (T, B, C)
    attn: Optional[Tensor]  # cross-attention weights, as fairseq returns them
    self_attn_state: Optional[List[Tensor]]  # fairseq's ONNX-export state (else None)
    self_map: Optional[Tensor]  # A_l of decoder self-attention (B, H, T, T)
    cross_map: Optional[Tensor]  # A_l of cross-attention (B, H, T, S)


class EATransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq decoder layer (cfg-based) with evolving self- and/or cross-attention."""

    def __init__(
        self,
        cfg,
        no_encoder_attn: bool = False,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        *,
        ea_self: Optional[EASpec] = None,
        ea_cross: Optional[EASpec] = None,
    ):
        self.ea_self_spec = ea_self  # read by the build_* hooks during super().__init__
        self.ea_cross_spec = ea_cross
        super().__init__(cfg, no_encoder_attn, add_bias_kv, add_zero_attn)

    def build_self_attention(self, embed_dim: int, cfg, add_bias_kv: bool = False, add_zero_attn: bool = False):
        if self.ea_self_spec is None:
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        if cfg.cross_self_attention:
            raise ValueError(
                "--cross-self-attention cannot be combined with evolving decoder self-attention "
                "(add --ea-no-decoder-self-attn)"
            )
        if cfg.decoder.xformers_att_config is not None:
            raise ValueError("--decoder-xformers-att-config cannot be combined with evolving attention")
        return EvolvingMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            ea=self.ea_self_spec,
            dropout=cfg.attention_dropout,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim: int, cfg):
        if self.ea_cross_spec is None:
            return super().build_encoder_attention(embed_dim, cfg)
        if cfg.encoder.xformers_att_config is not None:
            raise ValueError("--encoder-xformers-att-config cannot be combined with evolving attention")
        return EvolvingMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            ea=self.ea_cross_spec,
            kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim,
            dropout=cfg.attention_dropout,
            encoder_decoder_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
        ea_self_prev: Optional[Tensor] = None,
        ea_cross_prev: Optional[Tensor] = None,
    ) -> EADecoderLayerOutput:
        """fairseq's decoder-layer arguments, plus the previous layer's maps:
        ea_self_prev (B, H, T, T) and ea_cross_prev (B, H, T, S), or None.
        self_attn_padding_mask (B, T), True = pad, also marks the padded query rows.
        """
        self_link = cross_link = None
        if isinstance(self.self_attn, EvolvingMultiheadAttention):
            self_link = self.self_attn.evolve(ea_self_prev, self_attn_padding_mask)
        if isinstance(self.encoder_attn, EvolvingMultiheadAttention):
            cross_link = self.encoder_attn.evolve(ea_cross_prev, self_attn_padding_mask)
        with self_link or _NO_LINK, cross_link or _NO_LINK:
            x, attn, self_attn_state = super().forward(
                x,
                encoder_out=encoder_out,
                encoder_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                prev_self_attn_state=prev_self_attn_state,
                prev_attn_state=prev_attn_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=need_attn,
                need_head_weights=need_head_weights,
            )
        return EADecoderLayerOutput(
            x,
            attn,
            self_attn_state,
            self_link.out if self_link is not None else None,
            cross_link.out if cross_link is not None else None,
        )
