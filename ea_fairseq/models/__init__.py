from .ea_transformer import EATransformerDecoder, EATransformerEncoder, EATransformerModel  # noqa: F401
from .ea_config import EATransformerConfig, EvolvingAttentionConfig  # noqa: F401
