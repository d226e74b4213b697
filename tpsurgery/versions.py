"""The library versions tpsurgery is verified with, and the one keyword that changed inside them.

transformers renamed the key/value-cache argument of model forwards and mask builders from ``past_key_values`` to
``cache`` between 5.17 and 5.24. Models take ``**kwargs``, so the wrong name is silently ignored: on transformers 5.17
the prompt-prefix keys/values were dropped and every prefix-reusing embedding was wrong (issue 13). The name is now
read from the installed transformers; versions outside :data:`VERIFIED` (those CI runs the suite with, see
``.ci/run``) are refused by :func:`check_versions` at ``apply`` rather than trusted to give the right numbers.

>>> cache_kwarg() in ("cache", "past_key_values")
True
>>> check_versions({"transformers": "5.16.0", "nnsight": "0.8.1"})
Traceback (most recent call last):
...
tpsurgery.errors.ModelError: transformers 5.16.0 is installed, but tpsurgery is verified only with transformers>=5.17.0,<6 (embeddings from other versions may be wrong): pip install 'transformers>=5.17.0,<6' (or set TPSURGERY_UNVERIFIED_VERSIONS=1 to run anyway, at your own risk)
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from typing import Mapping

from .errors import ModelError

#: package -> (lowest verified version, first excluded version); tests/test_floors.py keeps the lows = pyproject floors.
VERIFIED = {"transformers": ("5.17.0", "6"), "nnsight": ("0.8.0", "0.9")}


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


OVERRIDE = "TPSURGERY_UNVERIFIED_VERSIONS"


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Raise :class:`ModelError` naming the installed and the supported versions when one is outside
    :data:`VERIFIED` (``installed``: name -> version, default: what is installed). Pre-releases of the first
    excluded version (``6.0.0.dev0``, ``6.0rc1``) are outside too; a version string that is not PEP 440 is refused.
    ``TPSURGERY_UNVERIFIED_VERSIONS=1`` turns the refusal into a warning (at your own risk).

    >>> check_versions({"transformers": "6.0.0.dev0", "nnsight": "0.8.1"})
    Traceback (most recent call last):
    ...
    tpsurgery.errors.ModelError: transformers 6.0.0.dev0 is installed, but tpsurgery is verified only with transformers>=5.17.0,<6 (embeddings from other versions may be wrong): pip install 'transformers>=5.17.0,<6' (or set TPSURGERY_UNVERIFIED_VERSIONS=1 to run anyway, at your own risk)
    """
    import os
    import warnings

    from packaging.version import InvalidVersion, Version

    for package, (low, high) in VERIFIED.items():
        version = installed.get(package) if installed is not None else _installed(package)
        if version is None:
            continue  # not installed: its own import fails with a clearer message
        spec = f"{package}>={low},<{high}"
        try:
            v = Version(version)
            ok = Version(low) <= v and Version(v.base_version) < Version(high)  # 6.0.0.dev0 is a 6, not a 5
        except InvalidVersion:
            ok = False
        if ok:
            continue
        msg = (f"{package} {version} is installed, but tpsurgery is verified only with {spec} (embeddings from "
               f"other versions may be wrong): pip install '{spec}'")
        if os.environ.get(OVERRIDE, "") not in ("", "0"):
            warnings.warn(msg + f" ({OVERRIDE} is set: running anyway)", UserWarning, stacklevel=3)
            continue
        raise ModelError(msg + f" (or set {OVERRIDE}=1 to run anyway, at your own risk)")


@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """The name (``cache`` or ``past_key_values``) of the key/value-cache argument in this transformers."""
    from transformers import masking_utils

    params = list(inspect.signature(masking_utils.create_causal_mask).parameters)
    name = params[3]
    if name not in ("cache", "past_key_values"):
        raise ModelError(f"this transformers ({_installed('transformers')}) names the cache argument {name!r}; "
                         f"tpsurgery knows 'cache' and 'past_key_values'")
    return name
