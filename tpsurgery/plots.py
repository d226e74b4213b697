"""Figures drawn off-screen (Agg: no GUI, no display), for every PNG tpsurgery writes.

>>> fig = agg_figure(4, 3, "a test plot")
>>> fig.get_size_inches().tolist()
[4.0, 3.0]
"""

from __future__ import annotations

from typing import Any

from .errors import import_extra


def agg_figure(width: float, height: float, purpose: str) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on an Agg canvas; without matplotlib, an error naming
    the ``eval`` extra and ``purpose``."""
    import_extra("matplotlib", "eval", purpose)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig
