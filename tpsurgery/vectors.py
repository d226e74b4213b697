"""Vectors an edit writes or adds: named ones (``zeros``, ``ones``, ``uniform``, ``gaussian``), lists of floats, and
``.npy`` / ``.safetensors`` files (checked against the content hash the recipe recorded when it was read).

>>> _named_vector("gaussian", 3, seed=0).shape, initial_vector(parse_recipe("placeholder: {init: ones}"), 2).tolist()
(torch.Size([3]), [1.0, 1.0])
"""

from __future__ import annotations

import torch

from .errors import RecipeError
from .recipe import Recipe, parse_recipe  # noqa: F401  (parse_recipe: the doctest)
from .schema import VectorFile


def _named_vector(kind: str, size: int, seed: int = 0, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(size)
    if kind == "ones":
        return torch.ones(size)
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(size, generator=g)
    return torch.randn(size, generator=g) * std + mean


def initial_vector(recipe: Recipe, hidden_size: int) -> torch.Tensor | None:
    """The placeholder's initial embedding-output row, or None for ``init: token``."""
    p = recipe.placeholder
    return None if p.init == "token" else _named_vector(p.init, hidden_size, p.seed, p.mean, p.std)


def load_vector_file(vf: VectorFile, field: str) -> torch.Tensor:
    """The 1-D float32 vector of a ``.npy`` / ``.safetensors`` file, checked against the content hash the recipe
    recorded when it was read."""
    import hashlib
    from pathlib import Path

    path = Path(vf.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(field, f"cannot read the vector file {vf.path!r}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != vf.sha256:
        raise RecipeError(field, f"the vector file {vf.path!r} changed since the recipe was read (sha256 "
                                 f"{vf.sha256[:12]}...): read the recipe again")
    try:
        if path.suffix == ".npy":
            import io

            import numpy as np

            arrays = {"": np.load(io.BytesIO(data), allow_pickle=False)}
        else:
            from safetensors.numpy import load as st_load

            arrays = st_load(data)
    except Exception as exc:  # numpy / safetensors raise various types for a damaged file
        raise RecipeError(field, f"{vf.path!r} is not a readable {path.suffix} file: {exc}") from None
    if len(arrays) != 1:
        raise RecipeError(field, f"{vf.path!r} holds {len(arrays)} tensors ({', '.join(arrays)}); give a file with "
                                 "exactly one")
    (array,) = arrays.values()
    t = torch.from_numpy(array.copy()).to(torch.float32)
    if t.dim() != 1 and not (t.dim() == 2 and t.shape[0] == 1):
        raise RecipeError(field, f"{vf.path!r} holds an array of shape {tuple(t.shape)}; a vector (shape [d]) is "
                                 "needed")
    return t.reshape(-1)


def edit_vector(spec, size: int, field: str) -> torch.Tensor:
    """The vector of an edit's ``value``: a named vector, a list of floats or a vector file, ``size`` wide."""
    if isinstance(spec.value, VectorFile):
        t = load_vector_file(spec.value, f"{field}.value")
    elif isinstance(spec.value, tuple):
        t = torch.tensor(spec.value, dtype=torch.float32)
    else:
        return _named_vector(spec.value, size, spec.seed, spec.mean, spec.std)
    if t.numel() != size:
        raise RecipeError(f"{field}.value", f"{t.numel()} numbers for rows of width {size}")
    return t
