import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

from recipe_fixtures import SHARED  # noqa: E402

BIN = Path(sys.executable).parent  # the environment's console scripts (fairseq-train, ...)
LETTERS = [chr(ord("a") + i) for i in range(12)]


def fairseq_cmd(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: fairseq's console script is not installed (run scripts/install.sh)")
    return str(path)


def run(cmd, cwd=None, input=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, input=input, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def _write_reversal(prefix: Path, n: int, rng: random.Random) -> None:
    with open(f"{prefix}.src", "w") as src, open(f"{prefix}.tgt", "w") as tgt:
        for _ in range(n):
            words = [rng.choice(LETTERS) for _ in range(rng.randint(3, 10))]
            src.write(" ".join(words) + "\n")
            tgt.write(" ".join(reversed(words)) + "\n")


@pytest.fixture(scope="session")
def reversal_data(tmp_path_factory):
    """A toy translation task (reverse a sequence of letters), raw and binarised by
    fairseq-preprocess. Returns (raw_dir, bin_dir)."""
    root = tmp_path_factory.mktemp("reversal")
    rng = random.Random(0)
    for split, n in (("train", 4000), ("valid", 200), ("test", 200)):
        _write_reversal(root / split, n, rng)
    run([fairseq_cmd("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
         "--destdir", root / "bin", "--joined-dictionary", "--workers", "1"])
    return root, root / "bin"


# Under pytest-xdist (scripts/test.sh runs one worker per core), each worker and the
# commands it starts use one thread: two workers with torch's default of one thread per
# core would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

# The modules that take longest (seconds of one thread, from `--durations`), started first
# so that no worker is left with one of them at the end. scripts/test.sh runs pytest-xdist
# with `--dist loadfile --no-loadscope-reorder`: a module's tests run on one worker (so a
# module-scoped fixture, a trained model or a prepared corpus, is built once), modules in
# the order of the collection, which this puts the slow ones first in.
SLOW_FIRST = ("test_recipes.py", "test_quality.py", "test_recipes_wmt.py", "test_cli.py", "test_scale.py",
              "test_from_vanilla.py", "test_plot.py", "test_recipe_inputs.py", "test_prepare_wmt_small.py",
              "test_tatoeba_recipe.py", "test_generation_options.py", "test_bad_input_sweep.py")


def _slow_modules_first(items) -> None:
    def rank(item):
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: collection order within a module and among the rest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``shared_data("multi30k", ...)`` read the real corpora under SHARED
    (../shared/data, or EA_SHARED_DATA). Where a folder is missing they are skipped, except
    under CI=true: there the run stops at once, naming the folder, so that CI cannot go
    green by skipping them. The slow modules go first (for pytest-xdist)."""
    _slow_modules_first(items)
    missing = {}
    for item in items:
        for mark in item.iter_markers("shared_data"):
            path = SHARED.joinpath(*mark.args)
            if not path.exists():
                missing.setdefault(path, []).append(item)
                item.add_marker(pytest.mark.skip(reason=f"{path} not found (EA_SHARED_DATA)"))
    if missing and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise pytest.UsageError("CI=true, but the shared corpora these tests need are missing: "
                                + ", ".join(f"{p} ({len(i)} tests)" for p, i in missing.items())
                                + ". Put ../shared beside the checkout or set EA_SHARED_DATA.")
