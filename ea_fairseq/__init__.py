"""ea-fairseq: evolving attention for fairseq translation models.

Importing the package registers the model ``ea_transformer`` (with its hydra config,
``EATransformerConfig``) and its architectures, and the optimizer ``ea_adam``
(``--user-dir ea_fairseq`` does this for fairseq's commands). ``ea_fairseq/config``
holds configs for ``fairseq-hydra-train`` (see docs/hydra.md).
"""

from .version import __version__  # noqa: F401
from . import models  # noqa: F401  (registers ea_transformer)
from . import optim  # noqa: F401  (registers --optimizer ea_adam)
