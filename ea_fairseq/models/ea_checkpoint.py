"""Loading checkpoints into ``ea_transformer``: fairseq's own Transformers, older EA
checkpoints, and clear errors for checkpoints that do not fit.

Called from the encoder's and decoder's ``upgrade_state_dict_named``, which fairseq
runs on every state dict before loading it (``--finetune-from-model``,
``--restore-file``, ``fairseq-generate``, ``from_pretrained``, ...):

- a checkpoint of fairseq's ``transformer_*`` (no EA weights) gets the model's own,
  freshly initialised (Dirac by default) EA convolutions, so that strict loading passes;
- an EA checkpoint saved before the state dict carried ``ea_version`` (version 0: the
  same layout) is upgraded to the current version;
- a checkpoint whose layer count, EA convolutions (``--ea-*`` flags) or tensor sizes
  do not match the model fails with an error naming the flag to change.
"""

import logging
import re
from typing import Dict, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# 1: ``ea_version`` buffer in encoder and decoder. 0 (no such key): ea-fairseq before it.
EA_STATE_VERSION = 1

# attention module name in a layer -> (what it is, the flags that decide its conv)
_STACKS = {
    ("encoder", "self_attn"): ("encoder self-attention", "--ea-no-encoder-self-attn, --ea-alpha"),
    ("decoder", "self_attn"): ("decoder self-attention", "--ea-no-decoder-self-attn, --ea-alpha"),
    ("decoder", "encoder_attn"): ("encoder-decoder attention", "--ea-cross-attn, --ea-alpha"),
}
_CONV_KEY = re.compile(r"layers\.(\d+)\.(\w+)\.ea_conv\.")


class EACheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def _layer_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    found = [int(m.group(1)) for m in map(pattern.match, keys) if m]
    return max(found) + 1 if found else 0


def _describe_convs(keys: Set[str], prefix: str, side: str) -> str:
    """'decoder self-attention (layers 2, 3; flags --ea-no-decoder-self-attn, --ea-alpha)'."""
    where: Dict[Tuple[str, str], Set[int]] = {}
    for key in keys:
        m = _CONV_KEY.match(key[len(prefix):])
        if m:
            where.setdefault((side, m.group(2)), set()).add(int(m.group(1)) + 1)
    parts = []
    for stack, layers in sorted(where.items()):
        what, flags = _STACKS.get(stack, (f"{side} {stack[1]}", "--ea-*"))
        parts.append(f"{what} (layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, sorted(layers)))}; flags {flags})")
    return "; ".join(parts)


def upgrade_ea_state_dict(
    module: nn.Module,
    state_dict: Dict[str, Tensor],
    name: str,
    side: str,
    layers_to_keep: Optional[Sequence[int]] = None,
) -> None:
    """Make ``state_dict`` (in place) loadable into ``module``, the EA encoder or
    decoder whose keys start with ``name``; ``side`` is "encoder" or "decoder".

    Raises EACheckpointMismatch naming the flag when the checkpoint cannot fit.
    """
    prefix = f"{name}." if name else ""
    own = {prefix + k: v for k, v in module.state_dict().items()}
    version_key = prefix + "ea_version"

    version = state_dict.get(version_key)
    if version is not None and int(version.flatten()[0].item()) > EA_STATE_VERSION:
        raise EACheckpointMismatch(
            f"{version_key}: the checkpoint was written by a newer ea-fairseq (state version "
            f"{int(version.flatten()[0].item())}, this one reads up to {EA_STATE_VERSION}); upgrade ea-fairseq"
        )

    if not layers_to_keep:  # with --*-layers-to-keep fairseq prunes the layers after this
        n_ckpt, n_model = _layer_count(state_dict, prefix), _layer_count(own, prefix)
        if n_ckpt and n_ckpt != n_model:
            raise EACheckpointMismatch(
                f"the checkpoint has {n_ckpt} {side} layers, this model {n_model}: build the model with "
                f"--{side}-layers {n_ckpt} (or the --arch the checkpoint was trained with)"
            )

        ckpt_convs = {k for k in state_dict if k.startswith(prefix) and ".ea_conv." in k}
        model_convs = {k for k in own if ".ea_conv." in k}
        is_ea_checkpoint = version is not None or bool(ckpt_convs)
        extra = ckpt_convs - model_convs
        if extra:
            raise EACheckpointMismatch(
                "the checkpoint has evolving-attention convolutions that this model does not build, in "
                f"{_describe_convs(extra, prefix, side)}: load it with the --ea-* flags it was trained with"
            )
        missing = model_convs - ckpt_convs
        if missing and is_ea_checkpoint:
            raise EACheckpointMismatch(
                "this model builds evolving-attention convolutions that the checkpoint (an EA checkpoint) "
                f"does not have, in {_describe_convs(missing, prefix, side)}: load it with the --ea-* flags "
                "it was trained with"
            )
        if missing:
            # fairseq's own Transformer: the EA convolutions start where this model
            # initialised them (an identity with --ea-conv-init dirac)
            for k in missing:
                state_dict[k] = own[k].detach().clone()
            logger.info(
                "%s: the checkpoint has no evolving-attention weights (a fairseq Transformer?); %d "
                "tensors of the EA convolutions start at their initialisation, in %s",
                side, len(missing), _describe_convs(missing, prefix, side),
            )

        wrong = [
            (k, tuple(state_dict[k].shape), tuple(v.shape))
            for k, v in own.items()
            if k in state_dict and k != version_key and tuple(state_dict[k].shape) != tuple(v.shape)
        ]
        if wrong:
            listed = "; ".join(f"{k}: checkpoint {c}, model {m}" for k, c, m in wrong[:4])
            if all(".ea_conv." in k for k, _, _ in wrong):
                hint = f"build the model with the checkpoint's --ea-kernel-size and --{side}-attention-heads"
            else:
                hint = (f"build the model with the checkpoint's --arch and sizes (--{side}-embed-dim, "
                        f"--{side}-ffn-embed-dim, ...) and its dictionaries")
            raise EACheckpointMismatch(f"{len(wrong)} tensor(s) differ in size ({listed}): {hint}")

    state_dict[version_key] = own[version_key].detach().clone() if version_key in own else torch.tensor(
        [float(EA_STATE_VERSION)])
