"""ea-fairseq: evolving attention for fairseq translation models.

Importing the package registers the model ``ea_transformer`` and its
architectures (``--user-dir ea_fairseq`` does this for fairseq's commands).
"""

from .version import __version__  # noqa: F401
from . import models  # noqa: F401  (registers ea_transformer)
