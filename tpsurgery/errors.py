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
    """A recipe is malformed; ``field`` names the offending recipe field (dotted path). A recipe with several
    problems raises one error listing all of them: ``problems`` holds every ``(field, message)``, the first first.

    >>> err = RecipeError("exit_layr", "unknown key; did you mean `exit_layer`?", more=[("tp.stpo", "unknown key")])
    >>> print(err)
    recipe field `exit_layr`: unknown key; did you mean `exit_layer`?
      and recipe field `tp.stpo`: unknown key
    >>> err.field, len(err.problems)
    ('exit_layr', 2)
    """

    def __init__(self, field: str, message: str, more: "tuple[tuple[str, str], ...] | list" = ()):
        self.field = field
        self.message = message
        self.problems: tuple[tuple[str, str], ...] = ((field, message), *map(tuple, more))
        text = f"recipe field `{field}`: {message}"
        text += "".join(f"\n  and recipe field `{f}`: {m}" for f, m in self.problems[1:])
        super().__init__(text)

    @classmethod
    def combine(cls, errors: "list[RecipeError]") -> "RecipeError":
        """One error listing the problems of several (in order)."""
        problems = [p for e in errors for p in e.problems]
        return cls(*problems[0], more=problems[1:])


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


class ExtraError(TpsurgeryError, ImportError):
    """An optional dependency is missing; the message names the pip extra that installs it."""


def import_extra(module: str, extra: str, purpose: str):
    """``importlib.import_module(module)``, or an :class:`ExtraError` naming the extra that installs it.

    >>> import_extra("json", "eval", "tests").__name__
    'json'
    >>> import_extra("tpsurgery_no_such_module", "eval", "Spearman correlations")
    Traceback (most recent call last):
    ...
    tpsurgery.errors.ExtraError: Spearman correlations need tpsurgery_no_such_module, not installed: pip install 'tpsurgery[eval]'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExtraError(f"{purpose} need {module.split('.')[0]}, not installed: pip install 'tpsurgery[{extra}]'") \
            from exc


class LaunchError(TpsurgeryError):
    """A multi-process run is set up inconsistently (torchrun's environment, another run's part files)."""
