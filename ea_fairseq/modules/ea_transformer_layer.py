"""fairseq Transformer layers whose attention modules evolve along their stack.

The layers build ``EvolvingMultiheadAttention`` through fairseq's ``build_*_attention``
hooks. Their forward takes the previous layer's maps as arguments, passes them to the
attention calls and returns this layer's maps. fairseq's layer forward calls its attention
modules with a fixed set of arguments and drops what they return besides the output, so
where a layer has an EA module its forward is rewritten here: it mirrors
fairseq/modules/transformer_layer.py (0.12.2, ``TransformerEncoderLayerBase.forward`` without
the BetterTransformer branch, and ``TransformerDecoderLayerBase.forward``). A layer without
EA modules runs fairseq's own forward.
"""

from typing import Dict, List, NamedTuple, Optional

import torch
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor, nn

from .evolving_attention import EASpec, EvolvingMultiheadAttention

# Parameters fairseq 0.12.2's encoder layer creates for its fused "BetterTransformer"
# inference path (copies of the weights, filled at checkpoint load). That path bypasses the
# layer's attention module, so EA layers never take it and do not keep these parameters
# (unused in training, DDP would reject them).
_BT_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
              "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _attend(module: nn.Module, prev: Optional[Tensor], query_padding_mask: Optional[Tensor], **kwargs):
    """One attention call: (out, weights, this layer's map or None)."""
    if isinstance(module, EvolvingMultiheadAttention):
        return module(**kwargs, ea_prev=prev, query_padding_mask=query_padding_mask)
    out, weights = module(**kwargs)
    return out, weights, None


def _set_state(module: nn.Module, incremental_state, state: Optional[List[Tensor]]) -> None:
    """fairseq's prev_self_attn_state / prev_attn_state: [key, value(, key_padding_mask)]."""
    if state is not None:
        assert incremental_state is not None
        saved = {"prev_key": state[0], "prev_value": state[1]}
        if len(state) >= 3:
            saved["prev_key_padding_mask"] = state[2]
        module._set_input_buffer(incremental_state, saved)


class EATransformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq encoder layer (cfg-based) with evolving self-attention; ``ea`` None: a layer
    of a stack with EA off, fairseq's layer (without the BetterTransformer path)."""

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
        return EvolvingMultiheadAttention(embed_dim, cfg.encoder.attention_heads, ea=self.ea_spec,
                                          dropout=cfg.attention_dropout, self_attention=True,
                                          q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fairseq's override adds the BetterTransformer copies; this layer has none (and
        # checkpoints of fairseq's own transformer may carry them)
        for name in _BT_PARAMS:
            state_dict.pop(prefix + name, None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None,
                ea_prev: Optional[Tensor] = None):
        """x (T, B, C); encoder_padding_mask (B, T), True = pad; ea_prev: A_{l-1} (B, H, T, T)
        or None. Returns (fairseq's layer output: x, or (x, fc_result) with return_fc;
        this layer's map A_l, None where EA is off)."""
        if self.ea_spec is None:
            return super().forward(x, encoder_padding_mask, attn_mask), None
        if attn_mask is not None:  # as fairseq: 1 -> a large negative number
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _, ea_map = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask, need_weights=False,
                                      attn_mask=attn_mask, ea_prev=ea_prev, query_padding_mask=encoder_padding_mask)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(x))))
        fc_result = x
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return ((x, fc_result) if self.return_fc else x), ea_map


class EADecoderLayerOutput(NamedTuple):
    x: Tensor  # (T, B, C)
    attn: Optional[Tensor]  # cross-attention weights, as fairseq returns them
    self_attn_state: Optional[List[Tensor]]  # fairseq's ONNX-export state: always None here
    self_map: Optional[Tensor]  # A_l of decoder self-attention (B, H, T, T)
    cross_map: Optional[Tensor]  # A_l of cross-attention (B, H, T, S)


class EATransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq decoder layer (cfg-based) with evolving self- and/or cross-attention."""

    def __init__(self, cfg, no_encoder_attn: bool = False, add_bias_kv: bool = False, add_zero_attn: bool = False,
                 *, ea_self: Optional[EASpec] = None, ea_cross: Optional[EASpec] = None):
        self.ea_self_spec, self.ea_cross_spec = ea_self, ea_cross  # read by the build_* hooks
        if (ea_self is not None or ea_cross is not None) and cfg.cross_self_attention:
            raise ValueError("--cross-self-attention cannot be combined with evolving attention in the decoder "
                             "(add --ea-no-decoder-self-attn and leave --ea-cross-attn off)")
        super().__init__(cfg, no_encoder_attn, add_bias_kv, add_zero_attn)

    def build_self_attention(self, embed_dim: int, cfg, add_bias_kv: bool = False, add_zero_attn: bool = False):
        if self.ea_self_spec is None:
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        if cfg.decoder.xformers_att_config is not None:
            raise ValueError("--decoder-xformers-att-config cannot be combined with evolving attention")
        return EvolvingMultiheadAttention(embed_dim, cfg.decoder.attention_heads, ea=self.ea_self_spec,
                                          dropout=cfg.attention_dropout, add_bias_kv=add_bias_kv,
                                          add_zero_attn=add_zero_attn, self_attention=True,
                                          q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size)

    def build_encoder_attention(self, embed_dim: int, cfg):
        if self.ea_cross_spec is None:
            return super().build_encoder_attention(embed_dim, cfg)
        if cfg.encoder.xformers_att_config is not None:
            raise ValueError("--encoder-xformers-att-config cannot be combined with evolving attention")
        return EvolvingMultiheadAttention(embed_dim, cfg.decoder.attention_heads, ea=self.ea_cross_spec,
                                          kdim=cfg.encoder.embed_dim, vdim=cfg.encoder.embed_dim,
                                          dropout=cfg.attention_dropout, encoder_decoder_attention=True,
                                          q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size)

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
        """fairseq's decoder-layer arguments, plus the previous layer's maps ea_self_prev
        (B, H, T, T) and ea_cross_prev (B, H, T, S), or None. self_attn_padding_mask (B, T),
        True = pad, also marks the padded query rows."""
        if self.ea_self_spec is None and self.ea_cross_spec is None:
            x, attn, state = super().forward(
                x, encoder_out, encoder_padding_mask, incremental_state, prev_self_attn_state, prev_attn_state,
                self_attn_mask, self_attn_padding_mask, need_attn, need_head_weights)
            return EADecoderLayerOutput(x, attn, state, None, None)
        need_attn = need_attn or need_head_weights
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        _set_state(self.self_attn, incremental_state, prev_self_attn_state)
        x, attn, self_map = _attend(self.self_attn, ea_self_prev, self_attn_padding_mask, query=x, key=x, value=x,
                                    key_padding_mask=self_attn_padding_mask, incremental_state=incremental_state,
                                    need_weights=False, attn_mask=self_attn_mask)
        if self.c_attn is not None:  # --scale-heads
            tgt_len, bsz = x.size(0), x.size(1)
            x = torch.einsum("tbhd,h->tbhd", x.view(tgt_len, bsz, self.nh, self.head_dim), self.c_attn)
            x = x.reshape(tgt_len, bsz, self.embed_dim)
        if self.attn_ln is not None:
            x = self.attn_ln(x)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        cross_map = None
        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            _set_state(self.encoder_attn, incremental_state, prev_attn_state)
            x, attn, cross_map = _attend(
                self.encoder_attn, ea_cross_prev, self_attn_padding_mask, query=x, key=encoder_out,
                value=encoder_out, key_padding_mask=encoder_padding_mask, incremental_state=incremental_state,
                static_kv=True, need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights)
            x = self.residual_connection(self.dropout_module(x), residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.activation_dropout_module(self.activation_fn(self.fc1(x)))
        if self.ffn_layernorm is not None:  # --scale-fc
            x = self.ffn_layernorm(x)
        x = self.dropout_module(self.fc2(x))
        if self.w_resid is not None:  # --scale-resids
            residual = torch.mul(self.w_resid, residual)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return EADecoderLayerOutput(x, attn, None, self_map, cross_map)

    def prepare_for_onnx_export_(self):
        raise NotImplementedError("evolving attention layers cannot be exported to ONNX")
