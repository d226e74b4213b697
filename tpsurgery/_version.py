"""The installed tpsurgery version, read from the package metadata (pyproject.toml is the one place it is written).

>>> from tpsurgery._version import __version__
>>> __version__ == importlib.metadata.version("tpsurgery")
True
"""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("tpsurgery")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
