from .evolving_attention import EAConv, EASpec, EvolvingMultiheadAttention  # noqa: F401
from .ea_transformer_layer import EATransformerDecoderLayer, EATransformerEncoderLayer  # noqa: F401
