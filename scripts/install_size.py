"""Install size of tpsurgery's core and of each extra: packages and MB on disk (docs/install.md's table).

    python scripts/install_size.py            # in the activated .venv of scripts/install.sh (has every extra)

For each of core, [eval], [mteb], [test] it asks pip what a fresh environment would install (`pip install --dry-run
--ignore-installed --report`, with the CPU torch==2.13.0 as CI pins it; pip reads only package metadata), then sums
the installed size of those packages as this venv holds them (the sizes in their RECORD files: what lands in
site-packages; byte-compiled caches not counted). A package this venv lacks is listed as not measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"core": ".", "[eval]": ".[eval]", "[mteb]": ".[mteb]", "[test]": ".[test]"}


def resolve(spec: str) -> dict[str, str]:
    """``{package: version}`` a fresh install of ``spec`` gets (tpsurgery itself left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "torch==2.13.0", spec], cwd=ROOT, check=True,
                       stderr=subprocess.DEVNULL)
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items
            if canonicalize_name(i["metadata"]["name"]) != "tpsurgery"}


def installed_bytes(name: str) -> int | None:
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return None
    return sum(f.size or 0 for f in dist.files or () if "__pycache__" not in str(f))


def main() -> None:
    sets = {k: resolve(v) for k, v in TARGETS.items()}
    sizes = {n: installed_bytes(n) for s in sets.values() for n in s}
    core = set(sets["core"])
    print("| install | packages | MB | added to core |")
    print("|---|---|---|---|")
    for k, pkgs in sets.items():
        mb = sum(sizes[n] or 0 for n in pkgs) / 1e6
        extra = set(pkgs) - core
        added = "" if k == "core" else f"+{len(extra)} packages, +{sum(sizes[n] or 0 for n in extra) / 1e6:.0f} MB: " \
            + ", ".join(sorted(extra, key=lambda n: -(sizes[n] or 0))[:6]) + (", ..." if len(extra) > 6 else "")
        print(f"| {'tpsurgery' if k == 'core' else 'tpsurgery' + k} | {len(pkgs)} | {mb:.0f} | {added} |")
    missing = sorted(n for n, s in sizes.items() if s is None)
    biggest = sorted(core, key=lambda n: -(sizes[n] or 0))[:8]
    print("\ncore's largest: " + ", ".join(f"{n} {(sizes[n] or 0) / 1e6:.0f} MB" for n in biggest))
    if missing:
        print("not measured (not in this venv): " + ", ".join(missing))


if __name__ == "__main__":
    main()
