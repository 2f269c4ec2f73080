"""The ``ea_transformer`` model: fairseq's Transformer with evolving attention.

Registered as model ``ea_transformer`` with one architecture per fairseq
Transformer architecture (``ea_`` + its name): each is fairseq's own function plus
the ``--ea-*`` defaults.
"""

import copy
import logging
from argparse import Namespace
from dataclasses import fields
from typing import Dict, List, Optional

import torch
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    ARCH_MODEL_NAME_REGISTRY,
    ARCH_MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from ..modules.ea_transformer_layer import EATransformerDecoderLayer, EATransformerEncoderLayer
from ..modules.evolving_attention import EASpec, EvolvingMultiheadAttention
from .ea_checkpoint import EA_STATE_VERSION, upgrade_ea_state_dict
from .ea_config import EATransformerConfig, EvolvingAttentionConfig, ea_base_architecture, ea_fields

logger = logging.getLogger(__name__)


def _wrap_layer(layer, cfg):
    """fairseq's layer wrappers, as in TransformerEncoderBase.build_encoder_layer:
    activation checkpointing, then FSDP (always wrapping checkpointed layers)."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


def _show_ea_defaults_in_help(parser) -> None:
    """Append "(default: ...)" to the --help text of the non-boolean --ea-* options
    (their parser defaults are deleted: the architecture fills them in)."""
    defaults = {f.name: f.default for f in ea_fields() if not isinstance(f.default, bool)}
    for action in parser._actions:
        if action.dest in defaults and action.help and "(default" not in action.help:
            action.help += f" (default: {defaults[action.dest]})"


class EATransformerEncoder(TransformerEncoderBase):
    """Transformer encoder whose self-attention maps evolve from layer to layer."""

    def __init__(self, cfg, dictionary, embed_tokens, ea: EvolvingAttentionConfig, return_fc: bool = False):
        self.ea_cfg = ea
        self.ea_specs: List[Optional[EASpec]] = []  # per layer, as built (None: plain attention)
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        # state-dict format of the EA weights (see ea_checkpoint.py)
        self.register_buffer("ea_version", torch.tensor([float(EA_STATE_VERSION)]))

    def upgrade_state_dict_named(self, state_dict, name):
        """fairseq's upgrades, then: a fairseq Transformer's state dict gets this
        model's initial EA convolutions; a mismatching one fails naming the flag."""
        super().upgrade_state_dict_named(state_dict, name)
        upgrade_ea_state_dict(self, state_dict, name, "encoder", self.cfg.encoder.layers_to_keep)
        return state_dict

    def build_encoder_layer(self, cfg):
        # fairseq calls this once per layer, in order
        self.ea_specs.append(self.ea_cfg.spec("encoder", len(self.ea_specs)))
        layer = EATransformerEncoderLayer(cfg, ea=self.ea_specs[-1], return_fc=self.return_fc)
        return _wrap_layer(layer, cfg)

    def forward_scriptable(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
    ):
        """As fairseq's (fairseq/models/transformer/transformer_encoder.py, 0.12.2),
        without its BetterTransformer / nested-tensor branch (which bypasses the
        layers' attention modules), and carrying the attention map from layer to
        layer. src_tokens: (B, T). Returns fairseq's encoder-out dict."""
        encoder_padding_mask = src_tokens.eq(self.padding_idx)  # (B, T), True = pad
        has_pads = src_tokens.device.type == "xla" or encoder_padding_mask.any()

        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        if has_pads:
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # (B, T, C) -> (T, B, C)

        encoder_states = []
        fc_results = []
        if return_all_hiddens:
            encoder_states.append(x)

        layer_padding_mask = encoder_padding_mask if has_pads else None
        ea_map: Optional[Tensor] = None  # A_{l-1}: (B, H, T, T)
        for layer in self.layers:
            out, ea_map = layer(x, encoder_padding_mask=layer_padding_mask, ea_prev=ea_map)
            if isinstance(out, tuple) and len(out) == 2:
                x, fc_result = out
            else:
                x, fc_result = out, None
            if return_all_hiddens and not torch.jit.is_scripting():
                encoder_states.append(x)
                fc_results.append(fc_result)

        if self.layer_norm is not None:
            x = self.layer_norm(x)

        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {
            "encoder_out": [x],  # (T, B, C)
            "encoder_padding_mask": [encoder_padding_mask],  # (B, T)
            "encoder_embedding": [encoder_embedding],  # (B, T, C)
            "encoder_states": encoder_states,  # List[(T, B, C)]
            "fc_results": fc_results,  # List[(T, B, C)]
            "src_tokens": [],
            "src_lengths": [src_lengths],
        }


class EATransformerDecoder(TransformerDecoderBase):
    """Transformer decoder whose self-attention (and optionally cross-attention)
    maps evolve from layer to layer, causally along the target axis."""

    def __init__(
        self,
        cfg,
        dictionary,
        embed_tokens,
        ea: EvolvingAttentionConfig,
        no_encoder_attn: bool = False,
        output_projection=None,
    ):
        self.ea_cfg = ea
        # per layer, as built (None: plain attention)
        self.ea_self_specs: List[Optional[EASpec]] = []
        self.ea_cross_specs: List[Optional[EASpec]] = []
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn,
                         output_projection=output_projection)
        self.register_buffer("ea_version", torch.tensor([float(EA_STATE_VERSION)]))

    def upgrade_state_dict_named(self, state_dict, name):
        """As EATransformerEncoder.upgrade_state_dict_named."""
        super().upgrade_state_dict_named(state_dict, name)
        upgrade_ea_state_dict(self, state_dict, name, "decoder", self.cfg.decoder.layers_to_keep)
        return state_dict

    def build_decoder_layer(self, cfg, no_encoder_attn: bool = False):
        # fairseq calls this once per layer, in order
        idx = len(self.ea_self_specs)
        self.ea_self_specs.append(self.ea_cfg.spec("decoder", idx))
        self.ea_cross_specs.append(None if no_encoder_attn else self.ea_cfg.spec("cross", idx))
        layer = EATransformerDecoderLayer(
            cfg,
            no_encoder_attn,
            ea_self=self.ea_self_specs[-1],
            ea_cross=self.ea_cross_specs[-1],
        )
        return _wrap_layer(layer, cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[Dict[str, List[Tensor]]],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """As fairseq's (fairseq/models/transformer/transformer_decoder.py, 0.12.2),
        carrying the self- and cross-attention maps from layer to layer.
        prev_output_tokens: (B, T). Returns (features (B, T, C), extra dict)."""
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1

        enc: Optional[Tensor] = None
        padding_mask: Optional[Tensor] = None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]  # (S, B, C)
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            padding_mask = encoder_out["encoder_padding_mask"][0]  # (B, S)

        x, prev_output_tokens = self._embed_targets(prev_output_tokens, incremental_state)  # (T, B, C)

        self_attn_padding_mask: Optional[Tensor] = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)  # (B, T)

        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        self_map: Optional[Tensor] = None  # (B, H, T, T)
        cross_map: Optional[Tensor] = None  # (B, H, T, S)
        for idx, layer in enumerate(self.layers):
            if incremental_state is None and not full_context_alignment:
                self_attn_mask = self.buffered_future_mask(x)
            else:
                self_attn_mask = None

            x, layer_attn, _, self_map, cross_map = layer(
                x,
                enc,
                padding_mask,
                incremental_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=bool(idx == alignment_layer),
                need_head_weights=bool(idx == alignment_layer),
                ea_self_prev=self_map,
                ea_cross_prev=cross_map,
            )
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)

        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average over heads

        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # (T, B, C) -> (B, T, C)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states}

    def _embed_targets(self, prev_output_tokens: Tensor, incremental_state):
        """Token + position embeddings of the decoder input, as in fairseq's
        extract_features_scriptable. Returns (x (T, B, C), the tokens embedded)."""
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        return x.transpose(0, 1), prev_output_tokens


def _is_structured(cfg) -> bool:
    """Whether ``cfg`` is a hierarchical model config (``cfg.encoder.layers``: the
    registered EATransformerConfig, as an object or a DictConfig) rather than a flat
    argparse-style one (``cfg.encoder_layers``: a Namespace or a flat DictConfig)."""
    if isinstance(cfg, TransformerConfig):
        return True
    return isinstance(cfg, DictConfig) and isinstance(cfg.get("encoder", None), DictConfig)


def _config_object(cfg) -> EATransformerConfig:
    """A structured model config as an ``EATransformerConfig`` object: typed and
    checked by omegaconf (a key that is not an option fails, naming it), the decoder's
    input/output dims following its embed_dim unless set."""
    if isinstance(cfg, DictConfig):
        name = cfg.get("_name", None)
        if name not in (None, "ea_transformer"):
            raise ValueError(
                f"model._name={name}: the ea_transformer_* architectures are presets of the "
                "command line (fairseq-train --arch); in a hydra config use model._name=ea_transformer "
                "and give the sizes (model.encoder.layers, ...: see ea_fairseq/config/*.yaml)"
            )
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EATransformerConfig), cfg))
    elif not isinstance(cfg, EATransformerConfig):
        raise TypeError(f"ea_transformer needs an EATransformerConfig, got {type(cfg).__name__}")
    for name in ("input_dim", "output_dim"):  # an unresolved "${.embed_dim}" (a Python-made config)
        if isinstance(getattr(cfg.decoder, name), str):
            setattr(cfg.decoder, name, cfg.decoder.embed_dim)
    return cfg


def _span(layers: List[int]) -> str:
    """[2, 3, 4] -> "2-4" (1-based layer numbers, contiguous or listed)."""
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def describe_ea(model: "EATransformerModel") -> List[str]:
    """One line per attention stack, read back from the built model: the EASpec each
    layer was built with and the shape of each EA convolution's weight, e.g.

    "decoder self-attention: evolving in layers 1-6 (alpha=0.5 beta=0.5 activation=linear
    init=dirac impl=fused causal=True); conv weight (4, 4, 3, 3) in layers 2-6"
    """
    lines = []
    stacks = (
        ("encoder self-attention", model.encoder.ea_specs, model.encoder.layers, "self_attn",
         "--ea-no-encoder-self-attn"),
        ("decoder self-attention", model.decoder.ea_self_specs, model.decoder.layers, "self_attn",
         "--ea-no-decoder-self-attn"),
        ("cross-attention", model.decoder.ea_cross_specs, model.decoder.layers, "encoder_attn",
         "without --ea-cross-attn"),
    )
    for what, specs, layers, attn, off_flag in stacks:
        on = [i for i, spec in enumerate(specs) if spec is not None]
        if not on:
            lines.append(f"{what}: plain attention ({off_flag})")
            continue
        settings = sorted({
            " ".join(f"{f.name}={getattr(specs[i], f.name)}" for f in fields(specs[i])
                     if f.name not in ("has_conv", "kernel_size"))
            for i in on
        })
        convs: Dict[tuple, List[int]] = {}
        for i in on:
            for name, p in layers[i].named_parameters():
                if name.startswith(f"{attn}.ea_conv.") and p.dim() == 4:
                    convs.setdefault(tuple(p.shape), []).append(i + 1)
        conv_text = "; ".join(f"conv weight {shape} in layers {_span(n)}" for shape, n in convs.items()) or "no conv"
        lines.append(f"{what}: evolving in layers {_span([i + 1 for i in on])} of {len(specs)} "
                     f"({' | '.join(settings)}); {conv_text}")
    return lines


def _warn_one_layer_stacks(model: "EATransformerModel", ea: EvolvingAttentionConfig) -> None:
    """A stack of one layer with EA on is built and runs, as plain attention: its only
    layer has no previous map to mix in and no convolution (layer 1 has none), so nothing
    evolves. Warned, not refused: the model is valid (a small test model, a stack pruned
    by --*-layers-to-keep, a checkpoint trained so) and equals what the user would get
    with EA off there."""
    n_enc, n_dec = len(model.encoder.layers), len(model.decoder.layers)
    for stack, n, flag, what, remedy in (
        ("encoder", n_enc, "--encoder-layers", "encoder self-attention", "add --ea-no-encoder-self-attn to say so"),
        ("decoder", n_dec, "--decoder-layers", "decoder self-attention", "add --ea-no-decoder-self-attn to say so"),
        ("cross", n_dec, "--decoder-layers", "cross-attention", "leave out --ea-cross-attn"),
    ):
        if n == 1 and ea.enabled(stack):
            logger.warning(
                "%s 1 with evolving %s: EA needs at least two layers in a stack to act (layer 1 "
                "has no previous map and no convolution), so nothing evolves there: that stack is "
                "plain attention. Use %s 2 or more, or %s.",
                flag, what, flag, remedy,
            )


@register_model("ea_transformer", dataclass=EATransformerConfig)
class EATransformerModel(TransformerModel):
    """fairseq's ``transformer`` with evolving attention (see ``--ea-*``).

    Two ways in, one model: ``fairseq-train --arch ea_transformer_* --ea-* ...`` (flat
    argparse options, each architecture a preset) and hydra configs with
    ``model._name: ea_transformer`` (the registered ``EATransformerConfig``: typed,
    checked keys; ``ea_fairseq/config/*.yaml``).
    """

    @classmethod
    def hub_models(cls):
        return {}  # no released EA checkpoints (TransformerModel lists vanilla ones)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # defaults come from the architecture (ea_base_architecture), as for fairseq's flags
        gen_parser_from_dataclass(parser, EvolvingAttentionConfig(), delete_default=True)
        _show_ea_defaults_in_help(parser)

    @classmethod
    def build_model(cls, args, task):
        """Build from either kind of fairseq model config:

        - flat (``args.encoder_layers``): the Namespace of ``fairseq-train --arch
          ea_transformer_*`` and of the checkpoints it saves, or a hydra config naming an
          architecture with flat keys; fairseq's legacy ``TransformerModel.build_model``;
        - structured (``cfg.encoder.layers``): ``EATransformerConfig``, from hydra's
          ``model._name: ea_transformer`` and its checkpoints, or made by fairseq from the
          Namespace of ``--arch ea_transformer``; fairseq's ``TransformerModelBase.build_model``.

        The EA options are read from the same config either way and checked here.
        """
        if _is_structured(args):
            cfg = _config_object(args)
            ea = EvolvingAttentionConfig.from_args(cfg)
            ea.validate()
            model = super(TransformerModel, cls).build_model(cfg, task)
        else:
            if isinstance(args, DictConfig):
                # TransformerConfig.from_namespace copies the keys it does not know (ours)
                # from vars(args), which a DictConfig does not have: hand it a Namespace
                with open_dict(args):
                    ea_base_architecture(args)  # kept in the config the checkpoint saves
                args = Namespace(**OmegaConf.to_container(args, resolve=True, enum_to_str=True))
            ea_base_architecture(args)
            ea = EvolvingAttentionConfig.from_args(args)
            ea.validate()
            model = super().build_model(args, task)
        for line in describe_ea(model):
            logger.info("evolving attention, %s", line)
        _warn_one_layer_stacks(model, ea)
        return model

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        """fairseq's ``from_pretrained`` (returns its GeneratorHubInterface). A checkpoint
        of fairseq's own ``transformer_*`` is turned into the matching ``ea_transformer_*``
        (see ``from_transformer``); ``--ea-*`` options go in as keyword arguments
        (``ea_alpha=0.3``), like any other override."""
        hub = super().from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path, **kwargs)
        for i, model in enumerate(hub.models):
            if not isinstance(model, EATransformerModel):
                ea = cls.from_transformer(model, hub.cfg.model, hub.task)
                ea.prepare_for_inference_(hub.cfg)
                hub.models[i] = ea
        return hub

    @classmethod
    def from_transformer(cls, model: TransformerModel, args: Namespace, task) -> "EATransformerModel":
        """The EA twin of a fairseq ``TransformerModel``: built from ``args`` (its
        model config, a Namespace; any ``ea_*`` options in it are used) with the
        ``ea_`` architecture of its ``--arch``, holding ``model``'s weights; the EA
        convolutions start at their initialisation (an identity by default)."""
        if not isinstance(args, Namespace):
            raise TypeError(f"from_transformer needs fairseq's (argparse) model config, got {type(args).__name__}")
        arch = getattr(args, "arch", None) or "transformer"
        ea_arch = arch if arch.startswith("ea_") else "ea_" + arch
        if ARCH_MODEL_REGISTRY.get(ea_arch) is not cls:
            raise ValueError(f"--arch {arch}: ea-fairseq has no {ea_arch} (it has: {', '.join(EA_ARCHS)})")
        ea_args = copy.deepcopy(args)
        ea_args.arch, ea_args._name = ea_arch, "ea_transformer"
        ARCH_CONFIG_REGISTRY[ea_arch](ea_args)
        ea = cls.build_model(ea_args, task)
        ea.load_state_dict(model.state_dict(), strict=True, model_cfg=ea_args)
        ref = next(model.parameters())
        return ea.to(device=ref.device, dtype=ref.dtype)

    def set_beam_size(self, beam_size: int) -> None:
        """fairseq's SequenceGenerator calls this on a model that has it (TransformerModel
        has not): EA cross-attention then keeps the encoder keys and values once per
        sentence instead of once per hypothesis, and reorders only its per-hypothesis rows.
        fairseq's own MultiheadAttention modules are left on their usual path."""
        for module in self.decoder.modules():
            if isinstance(module, EvolvingMultiheadAttention):
                module.set_beam_size(beam_size)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return EATransformerEncoder(
            TransformerConfig.from_namespace(args), src_dict, embed_tokens,
            ea=EvolvingAttentionConfig.from_args(args),
        )

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return EATransformerDecoder(
            TransformerConfig.from_namespace(args), tgt_dict, embed_tokens,
            ea=EvolvingAttentionConfig.from_args(args),
            no_encoder_attn=args.no_cross_attention,
        )


# fairseq Transformer architectures that get an ``ea_`` twin (all fairseq 0.12.2 has;
# it has no transformer_wmt_en_fr_big).
FAIRSEQ_ARCHS = (
    "transformer",
    "transformer_tiny",
    "transformer_iwslt_de_en",
    "transformer_wmt_en_de",
    "transformer_vaswani_wmt_en_de_big",
    "transformer_vaswani_wmt_en_fr_big",
    "transformer_wmt_en_de_big",
    "transformer_wmt_en_de_big_t2t",
)


def _register_ea_arch(fairseq_arch: str) -> None:
    parent = ARCH_CONFIG_REGISTRY[fairseq_arch]

    def arch(args):
        parent(args)
        ea_base_architecture(args)

    name = "ea_" + fairseq_arch
    arch.__name__ = arch.__qualname__ = name
    arch.__doc__ = f"fairseq's {fairseq_arch} plus the --ea-* defaults."
    if name in ARCH_CONFIG_REGISTRY:
        # "ea_transformer": register_model(dataclass=...) made it an architecture that
        # sets nothing (a hydra config takes the dataclass defaults); on the command line
        # --arch ea_transformer keeps fairseq's base_architecture and the EA defaults
        ARCH_CONFIG_REGISTRY[name] = arch
    else:
        register_model_architecture("ea_transformer", name)(arch)


EA_ARCHS = tuple("ea_" + name for name in FAIRSEQ_ARCHS)


def _keep_the_command_line_on_argparse() -> None:
    """fairseq's command line and hydra configure this model in two ways (flat flags, a
    nested dataclass), and fairseq would mix them up at two places:

    - a command line becomes a DictConfig through the model's dataclass when the class
      has one (``__dataclass``, set by register_model; dataclass/utils.py
      ``override_module_args``), which fills only top-level fields from the flat flags:
      --encoder-layers and the other encoder/decoder options would be lost. Without it
      the model config stays a Namespace, as for fairseq's own ``transformer``;
    - ``add_defaults`` (fairseq-train, fairseq-hydra-train) merges a model config with
      the dataclass of the model its ``_name`` maps to in ARCH_MODEL_NAME_REGISTRY,
      which fails on a Namespace. The ``ea_*`` architectures are command-line presets,
      configured as fairseq's legacy ``transformer`` (which has no dataclass).

    The dataclass stays registered for hydra (``model: ea_transformer``, typed keys) and
    for ``fairseq.models.build_model``, which merges a hydra model config with it."""
    setattr(EATransformerModel, "__dataclass", None)
    for arch in EA_ARCHS:
        ARCH_MODEL_NAME_REGISTRY[arch] = "transformer"


for _name in FAIRSEQ_ARCHS:
    _register_ea_arch(_name)
_keep_the_command_line_on_argparse()
