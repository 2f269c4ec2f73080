from .ea_transformer import EATransformerDecoder, EATransformerEncoder, EATransformerModel  # noqa: F401
from .ea_config import EvolvingAttentionConfig  # noqa: F401
