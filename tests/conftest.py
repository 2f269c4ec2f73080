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

# The tests that take longest (seconds of one thread, from `--durations`), started first so
# that no worker is left with one of them at the end.
SLOW_FIRST = ("test_recipes.py::iwslt", "test_quality.py::toy", "test_recipes.py::wmt_en_de",
              "test_recipes.py::test_wmt14_en_fr",
              "test_recipes.py::test_quickstart", "test_cli.py", "test_quality.py::test_cpu_preset",
              "test_scale.py", "test_from_vanilla.py", "test_plot.py")


def _share_module_fixtures(items) -> None:
    """Mark tests for ``--dist loadgroup``: the tests of a module that share a module-scoped
    fixture (a trained model, a prepared corpus) form one group, which runs on one worker, so
    the fixture is built once; tests that share none are spread one by one."""
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    shared = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        names = [f"{item.module.__name__}.py::{name}" for name, fdefs in (defs.name2fixturedefs.items() if defs else ())
                 if fdefs and fdefs[-1].scope == "module"]
        for name in names[1:]:
            parent[find(name)] = find(names[0])
        shared[item] = names
    for item, names in shared.items():
        if names:
            item.add_marker(pytest.mark.xdist_group(find(names[0])))

    def rank(item):
        key = (shared[item] and find(shared[item][0])) or item.nodeid.split("/")[-1]
        return next((i for i, slow in enumerate(SLOW_FIRST) if key.startswith(slow)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: collection order otherwise


def pytest_collection_modifyitems(config, items):
    """Tests marked ``shared_data("multi30k", ...)`` read the real corpora under SHARED
    (../shared/data, or EA_SHARED_DATA). Where a folder is missing they are skipped, except
    under CI=true: there the run stops at once, naming the folder, so that CI cannot go
    green by skipping them. Then the tests are grouped and ordered for pytest-xdist."""
    _share_module_fixtures(items)
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
