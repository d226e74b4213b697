"""One exception family for everything tpsurgery rejects.

>>> from tpsurgery.errors import RecipeError, TpsurgeryError
>>> err = RecipeError("tp.stop", "must be greater than tp.start (got start=3, stop=2)")
>>> isinstance(err, TpsurgeryError), str(err)
(True, 'recipe field `tp.stop`: must be greater than tp.start (got start=3, stop=2)')
"""

from __future__ import annotations


class TpsurgeryError(Exception):
    """Base class of every error tpsurgery raises on purpose; ``index`` names the input text when known (its position
    in the list given to ``encode``), else None.

    >>> TpsurgeryError("boom").index, BackendError("input 3: boom", index=3).index
    (None, 3)
    """

    def __init__(self, *args: object, index: int | None = None):
        self.index = index
        super().__init__(*args)


class RecipeError(TpsurgeryError, ValueError):
    """A recipe is malformed; ``field`` names the offending recipe field (dotted path)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"recipe field `{field}`: {message}")


class InputError(TpsurgeryError, ValueError):
    """An input text (``index`` in the list given to ``encode``) cannot be embedded."""

    def __init__(self, index: int | None, message: str):
        where = f"input {index}: " if index is not None else ""
        super().__init__(f"{where}{message}", index=index)


class ModelError(TpsurgeryError):
    """A model cannot be loaded, located or run (unsupported architecture, missing tokenizer, ...)."""


class BackendError(TpsurgeryError):
    """A backend failed while running a plan; ``layer`` names the decoder layer when known, ``index`` the input."""

    def __init__(self, message: str, layer: int | None = None, index: int | None = None):
        self.layer = layer
        where = f"layer {layer}: " if layer is not None else ""
        super().__init__(f"{where}{message}", index=index)


class LaunchError(TpsurgeryError):
    """A multi-process run is set up inconsistently (torchrun's environment, another run's part files)."""
