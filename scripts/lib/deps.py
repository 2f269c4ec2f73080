#!/usr/bin/env python3
"""The dependency decisions of scripts/install.sh and scripts/wheelhouse.sh, in one place.

Reads the ranges from setup.py (INSTALL_REQUIRES, EXTRAS_REQUIRE, TORCH_REQUIREMENT)
and the tested exact set from constraints.txt, and answers for the running Python:

  requirements [--extras E1,E2] [--no-torch]   the requirement lines to install
  torch                                        "ok VERSION BUILD" | "missing" | "old VERSION"
  constraints FILE [--keep-installed]          the constraint lines for this environment
  check [--extras E1,E2]                       are ea-fairseq's and fairseq's requirements met?
  satisfies REQUIREMENT                        exit 0 if the installed package meets it
  fairseq-sdist CACHE_DIR [--sdist FILE] [--offline]
                                               path of the hash-checked fairseq 0.12.2 sdist
                                               (downloaded into CACHE_DIR unless there)

--keep-installed (a user's environment): a package that is already installed and
within the range setup.py declares for it (any version, for one that setup.py does
not name) loses its pin, so pip keeps it; the pins of the rest choose the tested
versions for what is missing. Without it (the project's own environment, CI) every
pin holds. torch is pinned to the installed one in both cases: nothing may replace it.

Only the standard library and pip (its vendored `packaging`) are used, so this runs
in a bare environment before anything is installed.
"""

import argparse
import hashlib
import importlib.metadata as md
import os
import re
import runpy
import sys
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare venv: pip's copy
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
FAIRSEQ_URL = (
    "https://files.pythonhosted.org/packages/30/36/"
    "db42846570f479ac859be3b48d8b47f2ae9b0b9c77487a512f2f2ecbcb6b/fairseq-0.12.2.tar.gz"
)
FAIRSEQ_SHA256 = "34f1b18426bf3844714534162f065ab733e049597476daa35fffb4d06a92b524"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_lists() -> dict:
    return runpy.run_path(str(REPO / "setup.py"), run_name="ea_fairseq_setup")


def requirements(extras=(), torch=True) -> list:
    s = setup_lists()
    reqs = list(s["INSTALL_REQUIRES"])
    for e in extras:
        if e not in s["EXTRAS_REQUIRE"]:
            raise SystemExit(f"unknown extra {e!r}: setup.py has {', '.join(sorted(s['EXTRAS_REQUIRE']))}")
        reqs += s["EXTRAS_REQUIRE"][e]
    seen, out = set(), []
    for r in reqs:
        name = canonical(Requirement(r).name)
        if (name == "torch" and not torch) or r in seen:
            continue
        seen.add(r)
        out.append(r)
    return out


def installed_version(name: str):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def torch_status() -> str:
    req = Requirement(setup_lists()["TORCH_REQUIREMENT"])
    have = installed_version("torch")
    if have is None:
        return "missing"
    if not req.specifier.contains(Version(have), prereleases=True):
        return f"old {have}"
    build = "cuda" if "+cu" in have else "cpu" if "+cpu" in have else "unknown-build"
    try:  # the build torch itself reports (a CUDA wheel from PyPI has no +cuXXX label)
        import torch  # noqa: F401

        build = f"cuda-{torch.version.cuda}" if torch.version.cuda else "cpu"
    except Exception:  # noqa: BLE001 (an unimportable torch: pip check will say why)
        pass
    return f"ok {have} {build}"


def read_constraints(path: Path) -> list:
    """(Requirement, original line) for each constraint that applies to this Python."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"{path}:{n}: not a requirement line ({e}): {line!r}")
        if req.marker is None or req.marker.evaluate():
            out.append((req, line))
    return out


def constraints(path: Path, keep_installed: bool) -> list:
    declared = {}
    for r in requirements(extras=setup_lists()["EXTRAS_REQUIRE"]):
        req = Requirement(r)
        declared.setdefault(canonical(req.name), []).append(req.specifier)
    lines = []
    for req, line in read_constraints(path):
        name = canonical(req.name)
        if name == "torch":
            continue  # the installed torch is pinned below
        if keep_installed:
            have = installed_version(req.name)
            if have is not None and all(s.contains(Version(have), prereleases=True)
                                        for s in declared.get(name, [])):
                continue
        lines.append(str(req).split(";")[0].strip())
    torch = installed_version("torch")
    if torch is not None:
        lines.append(f"torch=={torch}")
    return lines


def check(extras=()) -> list:
    """Unmet requirements of ea-fairseq (with extras) and fairseq, as messages."""
    problems = []
    for dist, with_extras in (("ea-fairseq", extras), ("fairseq", ())):
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            problems.append(f"{dist} is not installed")
            continue
        for line in reqs:
            req = Requirement(line)
            env_ok = req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in (*with_extras, "")
            )
            if not env_ok:
                continue
            have = installed_version(req.name)
            if have is None:
                problems.append(f"{dist} requires {req}, which is not installed")
            elif not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{dist} requires {req}, but {req.name} {have} is installed")
    return problems


def satisfies(spec: str) -> bool:
    req = Requirement(spec)
    have = installed_version(req.name)
    return have is not None and req.specifier.contains(Version(have), prereleases=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fairseq_sdist(cache: Path, sdist=None, offline=False) -> Path:
    """The pristine fairseq 0.12.2 sdist, its sha256 checked: SDIST if given, else
    CACHE/fairseq-0.12.2.tar.gz, downloaded from PyPI if missing (not with offline)."""
    if sdist is not None:
        path = Path(sdist)
        if not path.is_file():
            raise SystemExit(f"FAIRSEQ_SDIST={sdist}: no such file")
    else:
        path = cache / "fairseq-0.12.2.tar.gz"
        if not path.is_file():
            if offline:
                raise SystemExit(f"{path} not found and downloads are off: put the sdist there "
                                 "(or set FAIRSEQ_SDIST)")
            import urllib.request

            cache.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f"{path.name}.part.{os.getpid()}")
            print(f"downloading {FAIRSEQ_URL}", file=sys.stderr)
            try:
                with urllib.request.urlopen(FAIRSEQ_URL, timeout=120) as r, open(part, "wb") as f:
                    while block := r.read(1 << 20):
                        f.write(block)
            except OSError as e:
                part.unlink(missing_ok=True)
                raise SystemExit(f"could not download {FAIRSEQ_URL}: {e} (FAIRSEQ_SDIST=FILE uses a local copy)")
            part.rename(path)
    have = sha256(path)
    if have != FAIRSEQ_SHA256:
        raise SystemExit(f"{path}: sha256 {have}, expected {FAIRSEQ_SHA256} (not the published "
                         "fairseq 0.12.2 sdist; delete it to download again)")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("requirements")
    p.add_argument("--extras", default="")
    p.add_argument("--no-torch", action="store_true")
    sub.add_parser("torch")
    p = sub.add_parser("constraints")
    p.add_argument("file", type=Path)
    p.add_argument("--keep-installed", action="store_true")
    p = sub.add_parser("check")
    p.add_argument("--extras", default="")
    p = sub.add_parser("satisfies")
    p.add_argument("requirement")
    p = sub.add_parser("fairseq-sdist")
    p.add_argument("cache", type=Path)
    p.add_argument("--sdist")
    p.add_argument("--offline", action="store_true")
    args = ap.parse_args(argv)
    extras = [e.strip() for e in getattr(args, "extras", "").split(",") if e.strip()]
    if args.cmd == "requirements":
        print("\n".join(requirements(extras, torch=not args.no_torch)))
    elif args.cmd == "torch":
        print(torch_status())
    elif args.cmd == "constraints":
        if not args.file.is_file():
            raise SystemExit(f"{args.file}: no such constraints file")
        print("\n".join(constraints(args.file, args.keep_installed)))
    elif args.cmd == "check":
        problems = check(extras)
        for p in problems:
            print(p)
        sys.exit(1 if problems else 0)
    elif args.cmd == "satisfies":
        sys.exit(0 if satisfies(args.requirement) else 1)
    elif args.cmd == "fairseq-sdist":
        print(fairseq_sdist(args.cache, args.sdist or None, args.offline))


if __name__ == "__main__":
    main()
