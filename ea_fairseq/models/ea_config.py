"""Command-line options of evolving attention (``--ea-*``).

The names start with ``ea_``: fairseq reroutes ``encoder_*`` / ``decoder_*``
attribute names into its encoder/decoder sub-configs.
"""

from argparse import Namespace
from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..modules.evolving_attention import EA_ACTIVATIONS, EA_INITS, EASpec

EA_ACTIVATION_CHOICES = ChoiceEnum(list(EA_ACTIVATIONS))
EA_INIT_CHOICES = ChoiceEnum(list(EA_INITS))

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

    @classmethod
    def from_args(cls, args: Namespace) -> "EvolvingAttentionConfig":
        """Read the ``ea_*`` options of a model namespace (defaults where absent)."""
        cfg = cls()
        for f in fields(cls):
            if not f.name.startswith("_") and hasattr(args, f.name):
                setattr(cfg, f.name, getattr(args, f.name))
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first invalid option."""
        for name in ("ea_alpha", "ea_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be a number in [0, 1], got {value!r}")
        k = self.ea_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"--ea-kernel-size must be an odd integer >= 1, got {k!r}")
        if str(self.ea_activation) not in EA_ACTIVATIONS:
            raise ValueError(
                f"--ea-activation must be one of {', '.join(EA_ACTIVATIONS)}, got {self.ea_activation!r}"
            )
        if str(self.ea_conv_init) not in EA_INITS:
            raise ValueError(f"--ea-conv-init must be one of {', '.join(EA_INITS)}, got {self.ea_conv_init!r}")

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
        )


def ea_base_architecture(args: Namespace) -> None:
    """Fill the ``ea_*`` options missing from ``args`` with the dataclass defaults."""
    for f in fields(EvolvingAttentionConfig):
        if not f.name.startswith("_") and not hasattr(args, f.name):
            setattr(args, f.name, f.default)
