"""``python -m ea_fairseq.config``: print the folder of the hydra configs (for --config-dir)."""

from . import CONFIG_DIR

print(CONFIG_DIR)
