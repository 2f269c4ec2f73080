"""hydra configs for ``fairseq-hydra-train`` (this folder: ``python -m ea_fairseq.config``).

    fairseq-hydra-train --config-dir "$(python -m ea_fairseq.config)" --config-name multi30k \
        task.data=data-bin/multi30k.de-en model.ea_alpha=0.3

Each config lists ``pkg://ea_fairseq.config`` in ``hydra.searchpath``. To read that
source hydra imports this package, and with it ``ea_fairseq``, before it composes the
config: model ``ea_transformer`` is then registered, so ``defaults: [model:
ea_transformer]`` finds its dataclass (EATransformerConfig) and every model key is typed
and checked while the command line is read. The import also registers the resolver
``${ea_fairseq.user_dir:}`` (this package's parent folder) that the configs give to
``common.user_dir``, so that processes fairseq spawns (one per GPU) import the plugin too,
and ``${ea_fairseq.required:...}``, which stands for a value the user must give
(``task.data``) and names it when it is missing.
"""

import os

from omegaconf import OmegaConf

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
USER_DIR = os.path.dirname(CONFIG_DIR)  # the ea_fairseq package: fairseq's --user-dir / common.user_dir
CONFIG_NAMES = ("multi30k", "iwslt14_de_en", "wmt14_en_de")



def _required(example: str) -> str:
    """Resolver of a value that has to come from the command line: resolving it means
    it was not given. ``example`` is the override to show, "task.data=data-bin/...".
    """
    key = example.split("=", 1)[0]
    raise ValueError(f"{key} is not set: give it on the command line, e.g. {example}")


if not OmegaConf.has_resolver("ea_fairseq.user_dir"):
    OmegaConf.register_new_resolver("ea_fairseq.user_dir", lambda: USER_DIR)
if not OmegaConf.has_resolver("ea_fairseq.required"):
    OmegaConf.register_new_resolver("ea_fairseq.required", _required)
