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
tpsurgery.errors.ModelError: transformers 5.16.0 is installed, but tpsurgery is verified only with transformers>=5.17.0,<6 (embeddings from other versions may be wrong): pip install 'transformers>=5.17.0,<6'
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


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Raise :class:`ModelError` naming the installed and the supported versions when one is outside
    :data:`VERIFIED` (``installed``: name -> version, default: what is installed)."""
    from packaging.version import Version

    for package, (low, high) in VERIFIED.items():
        version = installed.get(package) if installed is not None else _installed(package)
        if version is None:
            continue  # not installed: its own import fails with a clearer message
        if not Version(low) <= Version(version) < Version(high):
            spec = f"{package}>={low},<{high}"
            raise ModelError(f"{package} {version} is installed, but tpsurgery is verified only with {spec} "
                             f"(embeddings from other versions may be wrong): pip install '{spec}'")


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
