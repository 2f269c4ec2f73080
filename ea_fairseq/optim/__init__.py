"""Optimizers of ea-fairseq (importing registers them with fairseq)."""

from .ea_adam import EAAdam, EAAdamConfig, split_conv_kernels  # noqa: F401
