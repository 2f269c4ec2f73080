"""Options of evolving attention (``--ea-*``) and the model config that carries them.

``EvolvingAttentionConfig`` holds the EA options alone; ``EATransformerConfig`` is
fairseq's ``TransformerConfig`` plus those options, the dataclass ``ea_transformer``
is registered with (hydra configs, ``model.ea_alpha=0.3`` overrides, typed and
checked keys). The names start with ``ea_``: fairseq reroutes ``encoder_*`` /
``decoder_*`` attribute names into its encoder/decoder sub-configs.

Every option is checked when the model is built (``validate``): an invalid value
fails with a message naming the command-line flag and the hydra key.
"""

from argparse import Namespace
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer.transformer_config import DecoderConfig
from omegaconf import II

from ..modules.evolving_attention import EA_ACTIVATIONS, EA_IMPLS, EA_INITS, EASpec

EA_ACTIVATION_CHOICES = ChoiceEnum(list(EA_ACTIVATIONS))
EA_INIT_CHOICES = ChoiceEnum(list(EA_INITS))
EA_IMPL_CHOICES = ChoiceEnum(list(EA_IMPLS))

STACKS = ("encoder", "decoder", "cross")


@dataclass
class EvolvingAttentionConfig(FairseqDataclass):
    ea_alpha: float = field(
        default=0.5,
        metadata={
            "help": "weight of the convolution branch: A_l = alpha * conv(M_l) + (1 - alpha) * M_l, "
            "in [0, 1]; 0 builds no convolution"
        },
    )
    ea_beta: float = field(
        default=0.5,
        metadata={
            "help": "weight of the previous layer's attention map: M_l = (1 - beta) * S_l + beta * A_{l-1}, "
            "in [0, 1]; 0 keeps no residual link between layers"
        },
    )
    ea_kernel_size: int = field(
        default=3,
        metadata={"help": "size k of the k x k convolution over each attention map (odd, >= 1)"},
    )
    ea_no_encoder_self_attn: bool = field(
        default=False, metadata={"help": "plain attention in the encoder self-attention stack"}
    )
    ea_no_decoder_self_attn: bool = field(
        default=False, metadata={"help": "plain attention in the decoder self-attention stack"}
    )
    ea_cross_attn: bool = field(
        default=False,
        metadata={"help": "evolving attention also in the encoder-decoder (cross) attention stack"},
    )
    ea_activation: EA_ACTIVATION_CHOICES = field(
        default="linear",
        metadata={"help": "activation after the convolution; 'linear' keeps A_l = M_l at a Dirac init"},
    )
    ea_conv_init: EA_INIT_CHOICES = field(
        default="dirac",
        metadata={
            "help": "convolution initialisation: 'dirac' (identity, zero bias: the model starts as a "
            "residual-attention Transformer) or 'kaiming' (PyTorch's default)"
        },
    )
    ea_attn_impl: EA_IMPL_CHOICES = field(
        default="fused",
        metadata={
            "help": "how the attention maps are computed: 'eager' is the plain-PyTorch reference path, "
            "readable next to the equations; 'fused' the memory-saving fast path (same results)"
        },
    )

    @classmethod
    def from_args(cls, args: Any) -> "EvolvingAttentionConfig":
        """The ``ea_*`` options of a model config (an argparse Namespace, a
        TransformerConfig, an EATransformerConfig or a DictConfig), with the defaults
        where absent. Always returns an ``EvolvingAttentionConfig``."""
        cfg = EvolvingAttentionConfig()
        for f in ea_fields():
            try:
                value = getattr(args, f.name)
            except AttributeError:  # also omegaconf's ConfigAttributeError
                continue
            if value is not None:
                setattr(cfg, f.name, value)
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the flag (and the hydra key) of the first invalid option."""

        def bad(name: str, what: str, value) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')} must be {what}, got {value!r} (hydra: model.{name})")

        for name in ("ea_alpha", "ea_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise bad(name, "a number in [0, 1]", value)
        k = self.ea_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise bad("ea_kernel_size", "an odd integer >= 1", k)
        for name in ("ea_no_encoder_self_attn", "ea_no_decoder_self_attn", "ea_cross_attn"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false", getattr(self, name))
        for name, allowed in (("ea_activation", EA_ACTIVATIONS), ("ea_conv_init", EA_INITS),
                              ("ea_attn_impl", EA_IMPLS)):
            if str(getattr(self, name)) not in allowed:
                raise bad(name, f"one of {', '.join(allowed)}", str(getattr(self, name)))

    def enabled(self, stack: str) -> bool:
        if stack not in STACKS:
            raise KeyError(stack)
        if stack == "encoder":
            return not self.ea_no_encoder_self_attn
        if stack == "decoder":
            return not self.ea_no_decoder_self_attn
        return bool(self.ea_cross_attn)

    def spec(self, stack: str, layer_idx: int) -> Optional[EASpec]:
        """Settings of layer ``layer_idx`` (0-based) of ``stack``; None if EA is off there."""
        if not self.enabled(stack):
            return None
        return EASpec(
            alpha=float(self.ea_alpha),
            beta=float(self.ea_beta),
            kernel_size=int(self.ea_kernel_size),
            causal=stack != "encoder",
            activation=str(self.ea_activation),
            init=str(self.ea_conv_init),
            has_conv=layer_idx > 0 and self.ea_alpha > 0,
            impl=str(self.ea_attn_impl),
        )


def ea_fields():
    """The dataclass fields of the ``--ea-*`` options."""
    return [f for f in fields(EvolvingAttentionConfig) if f.name.startswith("ea_")]


def _decoder_config() -> DecoderConfig:
    """fairseq's DecoderConfig whose input/output dims follow ``embed_dim`` in a hydra
    config. (DecoderConfig's own ``II("model.decoder.embed_dim")`` defaults are replaced
    by 512 in its ``__post_init__``, so a config that sets only ``decoder.embed_dim``
    would get a 512-wide output projection.)"""
    cfg = DecoderConfig()
    cfg.input_dim = II(".embed_dim")
    cfg.output_dim = II(".embed_dim")
    return cfg


@dataclass
class EATransformerConfig(EvolvingAttentionConfig, TransformerConfig):
    """fairseq's ``TransformerConfig`` (its fields first) plus the ``--ea-*`` options:
    the config of model ``ea_transformer`` in hydra (``model._name: ea_transformer``)."""

    decoder: DecoderConfig = field(default_factory=_decoder_config)


def ea_base_architecture(args: Namespace) -> None:
    """Fill the ``ea_*`` options missing from ``args`` with the dataclass defaults."""
    for f in ea_fields():
        if getattr(args, f.name, None) is None:
            setattr(args, f.name, f.default)
