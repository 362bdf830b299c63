"""matplotlib's backend in the agent's interpreter: Agg's canvas, and a `show()` that displays.

matplotlib imports this module (`module://guest_agent.mplbackend`) once guest_agent/display.py
made it the default backend; nothing else imports it, so the agent never loads matplotlib itself.
Drawing is Agg's (headless, PNG); `plt.show()` sends every open figure as an image/png display
event and closes it, as Jupyter's inline backend does.
"""

from __future__ import annotations

from typing import Any

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

from .display import show_figures

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def show(*args: Any, **kwargs: Any) -> None:
    """`plt.show()`: display the open figures and close them (`block` means nothing here)."""
    show_figures()
