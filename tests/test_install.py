"""The install's decisions, checked without installing anything (a few seconds):
which torch install.sh keeps, replaces or refuses (fake torch metadata in a bare
venv), which pins of constraints.txt apply in a user's environment, the arguments of
install.sh --offline and wheelhouse.sh, and that setup.py, constraints.txt and the
scripts' messages agree on versions. The installs themselves are run by
scripts/smoke_pythons.sh and scripts/check_offline_install.sh (CI: .ci/run)."""

import os
import re
import runpy
import subprocess
import venv
from pathlib import Path

import packaging
import pip
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SETUP = runpy.run_path(str(REPO / "setup.py"), run_name="ea_fairseq_setup")


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A venv with pip only (the stand-in for a user's environment): its python. pip
    (and the packaging library that scripts/lib/deps.py prefers) are linked in from this
    test's environment, which is much faster than ensurepip."""
    root = tmp_path_factory.mktemp("env") / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    site = site_packages(root / "bin" / "python")
    for module in (pip, packaging):
        (site / module.__name__).symlink_to(Path(module.__file__).parent)
    return root / "bin" / "python"


def site_packages(python):
    return Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())


@pytest.fixture
def fake_dist(bare_venv):
    """fake_dist(name, version): metadata of an installed package (no module), removed after."""
    made = []

    def make(name, version):
        for d in made[:]:  # one version of a package at a time
            if d.name.startswith(f"{name}-"):
                remove(d)
        d = site_packages(bare_venv) / f"{name}-{version}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (d / "INSTALLER").write_text("test\n")
        made.append(d)

    def remove(d):
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        made.remove(d)

    yield make
    for d in made[:]:
        remove(d)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "EA_PYTHON", "TORCH_SPEC",
                                                           "EA_PINS", "EA_EXTRAS", "EA_VENV")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def install(*args, **env):
    return subprocess.run(["bash", str(SCRIPTS / "install.sh"), *args], capture_output=True, text=True,
                          env=clean_env(**env), timeout=120)


# ------------------------------------------------------------------- the user's torch

def test_install_keeps_a_torch_that_meets_the_requirement(bare_venv, fake_dist):
    for version in ("2.11.0+cu130", "2.13.0+cpu"):
        fake_dist("torch", version)
        proc = install("--dry-run", EA_PYTHON=bare_venv)
        assert proc.returncode == 0, proc.stderr
        assert f"keeping torch {version}" in proc.stderr and "meets torch>=" in proc.stderr, proc.stderr
        assert "would install no torch" in proc.stderr, proc.stderr


def test_install_says_which_torch_it_installs_where_there_is_none(bare_venv):
    proc = install("--dry-run", EA_PYTHON=bare_venv)
    assert proc.returncode == 0, proc.stderr
    assert "no torch in this environment: installing torch==2.13.0" in proc.stderr
    assert "set TORCH_SPEC" in proc.stderr and "would install torch==2.13.0" in proc.stderr
    proc = install("--dry-run", EA_PYTHON=bare_venv, TORCH_SPEC="torch==2.11.0")
    assert "would install torch==2.11.0" in proc.stderr, proc.stderr


def test_install_refuses_to_replace_an_old_torch_unless_asked(bare_venv, fake_dist):
    fake_dist("torch", "1.13.1")
    proc = install("--dry-run", EA_PYTHON=bare_venv)
    assert proc.returncode == 1
    assert "torch 1.13.1 is installed, but ea-fairseq needs torch>=" in proc.stderr
    assert "TORCH_SPEC" in proc.stderr
    proc = install("--dry-run", EA_PYTHON=bare_venv, TORCH_SPEC="torch==2.13.0")
    assert proc.returncode == 0 and "would install torch==2.13.0" in proc.stderr, proc.stderr


def test_install_offline_needs_the_torch_there(bare_venv, tmp_path):
    py = subprocess.check_output([str(bare_venv), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], text=True)
    (tmp_path / "WHEELHOUSE").write_text(f"python={py.strip()}\nextras=\nfairseq=x\ncreated=now\n")
    proc = install("--offline", tmp_path, EA_PYTHON=bare_venv)
    assert proc.returncode == 1
    assert "no torch in" in proc.stderr and "--offline installs none" in proc.stderr, proc.stderr


# ------------------------------------------------------------------- pins

def deps(python, *args):
    return subprocess.run([str(python), str(SCRIPTS / "lib" / "deps.py"), *args], capture_output=True, text=True,
                          check=True).stdout.split()


def test_a_users_numpy_within_range_keeps_its_version_the_rest_is_pinned(bare_venv, fake_dist):
    pinned = deps(bare_venv, "constraints", str(REPO / "constraints.txt"))
    assert any(line.startswith("numpy==") for line in pinned)
    fake_dist("numpy", "2.2.6")  # within numpy>=1.26
    fake_dist("tqdm", "4.10.0")  # below tqdm>=4.62: pip must change it, to the tested version
    fake_dist("torch", "2.11.0+cu130")
    kept = deps(bare_venv, "constraints", str(REPO / "constraints.txt"), "--keep-installed")
    assert not any(line.startswith("numpy") for line in kept), kept
    assert any(line.startswith("tqdm==") for line in kept), kept
    assert "torch==2.11.0+cu130" in kept and "torch==2.11.0+cu130" in deps(bare_venv, "constraints",
                                                                          str(REPO / "constraints.txt"))


def test_constraints_lie_within_setup_py_ranges_and_cover_every_tested_python():
    ranges = {}
    for r in [*SETUP["INSTALL_REQUIRES"], *sum(SETUP["EXTRAS_REQUIRE"].values(), [])]:
        req = Requirement(r)
        ranges.setdefault(canonical(req.name), []).append(req.specifier)
    pins = {}
    for n, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (version,) = [s.version for s in req.specifier if s.operator == "=="]
            pins.setdefault(canonical(req.name), []).append((req.marker, version, n))
    assert "torch" not in pins  # the environment's torch decides
    for name, specs in ranges.items():
        if name == "torch":
            continue
        assert name in pins, f"{name} (setup.py) has no pin in constraints.txt"
        for python in SETUP["TESTED_PYTHONS"]:
            env = {"python_version": python}
            applying = [(v, n) for m, v, n in pins[name] if m is None or m.evaluate(env)]
            assert len(applying) == 1, f"{name}: {len(applying)} pins apply on Python {python}"
            version, n = applying[0]
            assert all(s.contains(Version(version)) for s in specs), \
                f"constraints.txt:{n}: {name}=={version} is outside setup.py's {specs}"


def test_versions_told_agree():
    tested = SETUP["TESTED_PYTHONS"]
    assert SETUP["PYTHON_REQUIRES"] == f">={tested[0]}"
    setup_text = (REPO / "setup.py").read_text()
    assert "TESTED_PYTHONS" in setup_text.split("classifiers=")[1]
    span = f"{tested[0]}-{tested[-1]}"
    assert span in (SCRIPTS / "lib" / "common.sh").read_text()
    assert span in (SCRIPTS / "install.sh").read_text()
    assert "3.8" not in (SCRIPTS / "lib" / "common.sh").read_text()


# ------------------------------------------------------------------- argument errors

@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--offline"], "--offline needs a folder"),
    (["--offline", "/no/such/folder"], "--offline /no/such/folder: no such folder"),
])
def test_install_argument_errors(args, message):
    proc = install(*args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_install_offline_checks_the_folder_and_the_python(bare_venv, tmp_path):
    proc = install("--offline", tmp_path, EA_PYTHON=bare_venv)
    assert proc.returncode == 1 and "has no WHEELHOUSE file" in proc.stderr, proc.stderr
    (tmp_path / "WHEELHOUSE").write_text("python=3.99\nextras=\nfairseq=x\ncreated=now\n")
    proc = install("--offline", tmp_path, EA_PYTHON=bare_venv)
    assert proc.returncode == 1 and "was built for Python 3.99" in proc.stderr, proc.stderr
    # no environment chosen: no bare .venv is made, the message says how to choose one
    proc = install("--offline", tmp_path, EA_VENV=tmp_path / "no-venv")
    assert proc.returncode == 1 and "EA_PYTHON" in proc.stderr, proc.stderr
    assert not (tmp_path / "no-venv").exists()


@pytest.mark.parametrize("args, message", [
    ([], "no DIR given"),
    (["a", "b"], "one DIR only"),
    (["d", "--bogus"], "unknown option '--bogus'"),
    (["d", "--python"], "--python needs a version"),
    (["d", "--python", "3.99"], "Python 3.99: no python3.99 on PATH"),
    (["d", "--python", "/no/such/python"], "/no/such/python: not a Python interpreter"),
])
def test_wheelhouse_argument_errors(args, message, tmp_path):
    proc = subprocess.run(["bash", str(SCRIPTS / "wheelhouse.sh"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=clean_env(PYENV_ROOT=tmp_path / "no-pyenv"), timeout=60)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing half-made
