"""pyproject.toml's floors are what CI tests: scripts/test-lowest.sh installs scripts/lowest-constraints.txt and runs
the suite, so every direct dependency (``dependencies``, the ``test`` and ``eval`` extras) must have a ``>=`` floor there and be
pinned at exactly that version here. A floor raised in one file only fails this test."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tpsurgery import versions

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "scripts" / "lowest-constraints.txt"


def floors(pyproject: str) -> dict[str, Version | None]:
    """Direct dependency (core, ``test`` and ``eval``: what test-lowest.sh installs) -> its ``>=`` floor (None: no
    single floor)."""
    project = tomllib.loads(pyproject)["project"]
    out: dict[str, Version | None] = {}
    extras = project.get("optional-dependencies", {})
    for line in project["dependencies"] + extras.get("test", []) + extras.get("eval", []):
        req = Requirement(line)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        out[canonicalize_name(req.name)] = lows[0] if len(lows) == 1 else None
    return out


def pins(constraints: str) -> dict[str, Version | None]:
    """Package -> its ``==`` pin (None: not one exact pin)."""
    out: dict[str, Version | None] = {}
    for line in constraints.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            specs = list(req.specifier)
            exact = len(specs) == 1 and specs[0].operator == "=="
            out[canonicalize_name(req.name)] = Version(specs[0].version) if exact else None
    return out


def disagreements(pyproject: str, constraints: str) -> list[str]:
    low, pinned = floors(pyproject), pins(constraints)
    problems = []
    for name in sorted(low.keys() | pinned.keys()):
        if name not in pinned:
            problems.append(f"{name}: a dependency in pyproject.toml, not pinned in lowest-constraints.txt")
        elif name not in low:
            problems.append(f"{name}: pinned in lowest-constraints.txt, not a dependency in pyproject.toml")
        elif low[name] is None:
            problems.append(f"{name}: pyproject.toml gives it no single `>=` floor")
        elif pinned[name] is None:
            problems.append(f"{name}: lowest-constraints.txt does not pin it with one `==`")
        elif low[name] != pinned[name]:
            problems.append(f"{name}: pyproject.toml's floor is {low[name]}, "
                            f"lowest-constraints.txt pins {pinned[name]}")
    return problems


def test_ci_installs_every_dependency_at_pyprojects_floor():
    assert disagreements((ROOT / "pyproject.toml").read_text(), CONSTRAINTS.read_text()) == []


def test_the_versions_apply_accepts_start_at_pyprojects_floors():
    low = floors((ROOT / "pyproject.toml").read_text())
    lowest_accepted = {name: Version(low_high[0]) for name, low_high in versions.VERIFIED.items()}
    assert lowest_accepted == {name: low[name] for name in versions.VERIFIED}


def test_each_kind_of_disagreement_is_reported():
    pyproject = """[project]
dependencies = ["numpy>=2.0", "scipy>=1.13", "torch", "typer>=0.13", "gone>=1"]
[project.optional-dependencies]
test = ["pytest>=8"]
"""
    constraints = "numpy==2.0.0  # the same version\nscipy==1.10\ntorch==2.13\ntyper>=0.13\nextra==1\n"
    assert disagreements(pyproject, constraints) == [
        "extra: pinned in lowest-constraints.txt, not a dependency in pyproject.toml",
        "gone: a dependency in pyproject.toml, not pinned in lowest-constraints.txt",
        "pytest: a dependency in pyproject.toml, not pinned in lowest-constraints.txt",
        "scipy: pyproject.toml's floor is 1.13, lowest-constraints.txt pins 1.10",
        "torch: pyproject.toml gives it no single `>=` floor",
        "typer: lowest-constraints.txt does not pin it with one `==`",
    ]
