"""Backends execute a :class:`~tpsurgery.plan.Plan` on a :class:`~tpsurgery.batch.Batch`; :class:`Backend` is the
contract every backend meets, :class:`ResumableBackend` the one of backends that can also start a run at a layer.

>>> from tpsurgery.backends.nnsight_backend import NNsightBackend
>>> from tpsurgery.testing import tiny_model
>>> backend = NNsightBackend(tiny_model("llama")[0])
>>> isinstance(backend, Backend), isinstance(backend, ResumableBackend), backend.supports_prefix
(True, True, True)
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..arch import ArchSpec
from ..batch import Batch
from ..plan import Plan
from ..prefix import Prefix


@runtime_checkable
class Backend(Protocol):
    """What the embedder needs of a backend. ``run`` returns ``[B, d]`` float32 pooled embeddings read at the plan's
    exit layer, or ``[B, exit_layer + 1, d]`` (``hidden_states[0..M]``, each pooled) with ``all_layers=True``.

    ``supports_prefix``: ``run`` takes ``prefix=`` (a prompt prefix's keys/values, :mod:`tpsurgery.prefix`; the batch
    then holds the rows after it); a backend without it raises :class:`~tpsurgery.errors.BackendError` when given one.
    ``close`` undoes whatever the backend left on the model object (a no-op where nothing is left).
    """

    name: ClassVar[str]
    supports_prefix: ClassVar[bool]
    model: Any  # the transformers model whose weights run
    spec: ArchSpec
    n_layers: int

    def run(self, plan: Plan, batch: Batch, all_layers: bool = False, prefix: Prefix | None = None) -> torch.Tensor:
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class ResumableBackend(Backend, Protocol):
    """A backend that can start a run at a decoder layer from another plan's hidden state (shared sweeps,
    :mod:`tpsurgery.sharing`)."""

    def run_part(self, plan: Plan, batch: Batch, start: int = 0, hidden: torch.Tensor | None = None,
                 keep: tuple[int, ...] = (), prefix: Prefix | None = None
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``[B, n, d]`` pooled reads of ``hidden_states[start + 1 .. M]`` (``[0 .. M]`` when ``start`` is 0), and
        ``{j: hidden_states[j]}`` for the layers in ``keep`` (whole sequences, before this plan's edits of layer
        ``j``). ``start > 0``: decoder layers ``< start`` do not run; ``hidden`` (``hidden_states[start]`` of a plan
        that agrees with this one on those layers) is what they would have returned."""
        ...
