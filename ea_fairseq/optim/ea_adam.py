"""``--optimizer ea_adam``: fairseq's Adam, optionally without weight decay on the
evolving-attention convolution kernels.

fairseq's Adam decays every parameter by ``lr * weight_decay`` per update (decoupled,
AdamW-style). For an EA conv initialised as a Dirac (identity) kernel that pulls the
identity towards zero. ``--ea-conv-no-weight-decay`` puts the conv kernels in a second
parameter group with ``weight_decay = 0``; everything else is fairseq's Adam unchanged.

Which parameters: the 4-D ones, i.e. conv kernels of shape (H, H, k, k). A Transformer
has no other 4-D parameters (embeddings and projections are 2-D, biases and norms 1-D);
the conv biases (1-D, initialised at 0) keep their decay. fairseq's ``--fp16`` / ``--bf16``
flatten all parameters into one 1-D tensor before the optimizer sees them: then no
kernel can be told apart, and the option stops with a message (use
``--memory-efficient-fp16`` / ``--memory-efficient-bf16``, or ``--fp16-no-flatten-grads``).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Tuple

import torch
from fairseq.optim import register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

logger = logging.getLogger(__name__)


@dataclass
class EAAdamConfig(FairseqAdamConfig):
    ea_conv_no_weight_decay: bool = field(
        default=False,
        metadata={
            "help": "no weight decay on the evolving-attention conv kernels (4-D parameters, (H, H, k, k)), "
            "so that --weight-decay does not pull their Dirac (identity) initialisation towards zero; "
            "other parameters keep --weight-decay"
        },
    )


def split_conv_kernels(params: Iterable[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(others, kernels): the 4-D parameters (conv kernels, (C_out, C_in, k, k)) apart."""
    others, kernels = [], []
    for p in params:
        (kernels if p.dim() == 4 else others).append(p)
    return others, kernels


@register_optimizer("ea_adam", dataclass=EAAdamConfig)
class EAAdam(FairseqAdam):
    """fairseq's Adam (``--optimizer adam``) plus ``--ea-conv-no-weight-decay``."""

    def __init__(self, cfg: EAAdamConfig, params):
        params = list(params)
        if getattr(cfg, "ea_conv_no_weight_decay", False):
            if params and isinstance(params[0], dict):
                raise ValueError("--ea-conv-no-weight-decay: the optimizer was given parameter groups, "
                                 "not parameters; use it with fairseq's own trainer")
            others, kernels = split_conv_kernels(params)
            if not kernels:
                raise ValueError(
                    "--ea-conv-no-weight-decay: no conv kernel (4-D parameter) reached the optimizer. "
                    "With --fp16/--bf16 fairseq flattens the parameters: add --memory-efficient-fp16 "
                    "(or --memory-efficient-bf16, or --fp16-no-flatten-grads); or the model has no EA conv "
                    "(--ea-alpha 0, or EA switched off)")
            logger.info(f"ea_adam: no weight decay on {len(kernels)} conv kernels "
                        f"({sum(p.numel() for p in kernels):,} weights)")
            groups: List[Dict[str, Any]] = [{"params": others}, {"params": kernels, "weight_decay": 0.0}]
            super().__init__(cfg, groups)
        else:
            super().__init__(cfg, params)
