"""One look for every figure in the book: style, method colours, small helpers.

A method keeps its colour in every chapter: look it up with :func:`color`.
Introduced in Chapter 0.
"""
from __future__ import annotations

import io

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg
import torch

from effnb.config import check_choice, widgets_enabled

__all__ = ["COLORS", "color", "new_figure", "sample_grid", "use_style", "what_if"]

# Colour-blind-safe (Okabe-Ito). Keys are roles, so that chapters agree.
COLORS: dict[str, str] = {
    "baseline": "#7f7f7f",
    "method": "#d55e00",
    "alternative": "#0072b2",
    "fp32": "#000000",
    "fp16": "#56b4e9",
    "int8": "#009e73",
    "int4": "#e69f00",
    "memory": "#0072b2",
    "compute": "#d55e00",
    "measured": "#cc79a7",
    "predicted": "#009e73",
    "reproduced": "#009e73",
    "not reproduced": "#d55e00",
    "inconclusive": "#7f7f7f",
}

_STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.figsize": (6.4, 3.6),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "font.size": 10,
}


def use_style() -> None:
    """Apply the book's matplotlib style (modest DPI keeps notebook images small)."""
    mpl.rcParams.update(_STYLE)


def color(role: str) -> str:
    """The colour of ``role`` (e.g. ``"baseline"``, ``"method"``); an unknown role raises ``ValueError``
    naming the known ones (:func:`effnb.config.check_choice`)."""
    check_choice("role", role, sorted(COLORS))
    return COLORS[role]


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 3.6, nrows: int = 1):
    """A styled figure with ``nrows`` × ``ncols`` axes (constrained layout); returns ``(fig, axes)``."""
    use_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained")
    return fig, axes


def sample_grid(ax, samples, labels, title: str, per_class: int = 3, classes: int = 10) -> None:
    """Draw class-conditional samples as a grid: one column per class ``0..classes-1``, ``per_class``
    rows (fewer if some class has fewer samples), from ``samples`` (N, C, H, W) in [-1, 1] (the first
    channel is drawn, grey) asked for ``labels`` (N,). Introduced in Chapter 5."""
    counts = [int((labels == c).sum()) for c in range(classes)]
    per_class = min(per_class, *counts)
    if per_class < 1:
        raise ValueError(f"sample_grid needs at least one sample of every class 0..{classes - 1}; the counts are {counts}.")
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)])
    h, w = samples.shape[-2:]
    images = samples[idx, 0].reshape(classes, per_class, h, w).permute(1, 2, 0, 3).reshape(per_class * h, classes * w)
    ax.imshow(images.detach().cpu().numpy(), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def what_if(draw, **choices) -> None:
    """Let the reader turn knobs: ``draw(**values)`` redraws live from controls in JupyterLab or Colab.

    Each keyword is ``name=(default, options)``: a list of numbers becomes a slider over those values,
    anything else a drop-down. ``draw`` draws into new figures (and may print); :func:`what_if` shows them.
    Where :func:`effnb.config.widgets_enabled` is false (the book's build, papermill, nbval, the grader),
    ``draw`` runs once with the defaults, so the rendered book shows the defaults' figure and no widget
    state enters stored outputs. Raises ``ValueError`` when a default is not among its options.
    Introduced in Chapter 1.
    """
    for name, (default, options) in choices.items():
        if default not in options:
            raise ValueError(f"what_if: the default {default!r} of {name!r} is not one of its options "
                             f"{list(options)}; add it to the options or pick one of them.")

    if not widgets_enabled():
        draw(**{name: default for name, (default, _) in choices.items()})
        plt.show()
        return
    import ipywidgets as widgets
    from IPython.display import Image, display

    def redraw(**values):
        plt.close("all")
        draw(**values)
        for number in plt.get_fignums():
            figure = plt.figure(number)
            buffer = io.BytesIO()
            # A fresh canvas: from a widget's callback in JupyterLab, plt.show() and figure.savefig() drew
            # an empty PNG (the figure's own cached Agg renderer had its draw calls switched off), while a
            # new canvas draws every artist (tests/test_lab.py checks the redrawn figure is not empty).
            FigureCanvasAgg(figure).print_png(buffer)
            plt.close(figure)
            display(Image(buffer.getvalue()))

    controls = {}
    for name, (default, options) in choices.items():
        numeric = all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options)
        kind = widgets.SelectionSlider if numeric else widgets.Dropdown
        extra = {"continuous_update": False} if numeric else {}
        controls[name] = kind(options=list(options), value=default, description=name,
                              style={"description_width": "initial"}, **extra)
    panel = widgets.VBox([widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")),
                          widgets.interactive_output(redraw, controls)])
    panel.add_class("effnb-what-if")
    display(panel)
