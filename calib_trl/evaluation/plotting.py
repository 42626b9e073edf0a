"""Reliability diagrams drawn with matplotlib.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never through `pyplot`: no window is
opened, no global state is touched, and whatever backend the user selected stays selected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..metrics import reliability_diagram_data

__all__ = ["plot_reliability_diagram", "plot_reliability_diagrams"]

_DATA_KEYS = ("bin_edges", "bin_counts", "bin_accuracy", "bin_confidence")

_ACCURACY_COLOR = "#1f77b4"
_GAP_COLOR = "#d62728"

_DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI, format=path.suffix[1:] or "png")


def _resolve_data(data: Any, confidences: Any, correct: Any, n_bins: int, where: str) -> Mapping[str, Any]:
    """The reliability-diagram data of a panel: precomputed `data`, or computed from `(confidences, correct)`."""
    if data is not None:
        if confidences is not None or correct is not None:
            raise ValueError(f"{where}: pass either `data` or `confidences` and `correct`, not both.")
        if not isinstance(data, Mapping) or any(key not in data for key in _DATA_KEYS):
            raise ValueError(
                f"{where}: `data` must be the dict returned by `reliability_diagram_data` (with keys {_DATA_KEYS})."
            )
        n = len(data["bin_counts"])
        if len(data["bin_edges"]) != n + 1 or len(data["bin_accuracy"]) != n or len(data["bin_confidence"]) != n:
            raise ValueError(f"{where}: `data` has inconsistent lengths (expected n_bins + 1 edges and n_bins bins).")
        return data
    if confidences is None or correct is None:
        raise ValueError(f"{where}: pass `confidences` and `correct`, or precomputed `data`.")
    return reliability_diagram_data(confidences, correct, n_bins=n_bins)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _draw(ax, data: Mapping[str, Any], title: str | None) -> None:
    edges = [float(e) for e in data["bin_edges"]]
    counts = [int(c) for c in data["bin_counts"]]
    n_bins = len(counts)
    lefts, widths = edges[:-1], [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
    filled = [c > 0 and not _is_empty(a) for c, a in zip(counts, data["bin_accuracy"])]
    accuracy = [float(a) if f else 0.0 for a, f in zip(data["bin_accuracy"], filled)]
    confidence = [float(c) if f else 0.0 for c, f in zip(data["bin_confidence"], filled)]

    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="Perfect calibration", zorder=1)
    ax.bar(
        lefts,
        accuracy,
        width=widths,
        align="edge",
        color=_ACCURACY_COLOR,
        edgecolor="black",
        linewidth=0.6,
        alpha=0.85,
        label="Accuracy",
        gid="accuracy",
        zorder=2,
    )
    # Gap between the mean confidence and the accuracy of every non-empty bin.
    gap_lefts = [x for x, f in zip(lefts, filled) if f]
    gap_widths = [w for w, f in zip(widths, filled) if f]
    gap_bottoms = [min(a, c) for a, c, f in zip(accuracy, confidence, filled) if f]
    gap_heights = [abs(c - a) for a, c, f in zip(accuracy, confidence, filled) if f]
    ax.bar(
        gap_lefts,
        gap_heights,
        bottom=gap_bottoms,
        width=gap_widths,
        align="edge",
        color=_GAP_COLOR,
        alpha=0.3,
        edgecolor=_GAP_COLOR,
        hatch="//",
        linewidth=0.6,
        label="Gap to confidence",
        gid="gap",
        zorder=3,
    )

    fontsize = max(5.0, min(8.0, 80.0 / n_bins))
    for left, width, acc, count, is_filled in zip(lefts, widths, accuracy, counts, filled):
        if not is_filled:
            continue
        inside = acc > 0.9  # no room above the bar: write the count inside it
        ax.text(
            left + width / 2,
            acc - 0.01 if inside else acc + 0.01,
            str(count),
            ha="center",
            va="top" if inside else "bottom",
            fontsize=fontsize,
            color="white" if inside else "black",
            gid="bin_count",
            zorder=4,
        )

    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    legend_title = None
    ece = data.get("ece")
    if ece is not None and not (isinstance(ece, float) and math.isnan(ece)):
        legend_title = f"ECE = {float(ece):.4f}"
    ax.legend(loc="upper left", title=legend_title, fontsize=8, title_fontsize=9)
    if title is not None:
        ax.set_title(title)


def plot_reliability_diagram(
    confidences: Any = None,
    correct: Any = None,
    *,
    data: Mapping[str, Any] | None = None,
    n_bins: int = 10,
    title: str | None = None,
    ax=None,
    path: str | Path | None = None,
) -> Figure:
    r"""
    Draw a reliability diagram: per-bin accuracy against confidence.

    One bar per equal-width bin (as wide as the bin) shows the accuracy of the bin; the dashed diagonal is perfect
    calibration; the hatched red band between a bar's top and the bin's mean confidence is the calibration gap (above
    the bar: overconfidence). The number of examples of every non-empty bin is written above its bar (inside it when
    the bar is nearly full), and the legend shows the ECE.

    Args:
        confidences (`array-like` of shape `(N,)`, *optional*):
            Confidence of each prediction, in `[0, 1]`. Required unless `data` is given.
        correct (`array-like` of shape `(N,)`, *optional*):
            Whether each prediction is right. Required unless `data` is given.
        data (`dict`, *optional*):
            Precomputed output of `calib_trl.metrics.reliability_diagram_data` (also after a JSON round trip, where
            empty bins are `None`). When given, `confidences`, `correct` and `n_bins` are not used.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of equal-width bins when computing from `confidences` and `correct`.
        title (`str`, *optional*):
            Title of the axes.
        ax (`matplotlib.axes.Axes`, *optional*):
            Axes to draw on. By default a new figure (not registered with `pyplot`) is created.
        path (`str` or `os.PathLike`, *optional*):
            Where to save the figure (PNG at 120 dpi unless the suffix names another format); parent directories are
            created.

    Returns:
        `matplotlib.figure.Figure`: The figure holding the diagram (the figure of `ax` when `ax` is given).
    """
    data = _resolve_data(data, confidences, correct, n_bins, "plot_reliability_diagram")
    if ax is None:
        figure = _new_figure(4.6, 4.6)
        ax = figure.add_subplot()
    else:
        figure = ax.get_figure()
    _draw(ax, data, title)
    if path is not None:
        _save(figure, path)
    return figure


def plot_reliability_diagrams(
    panels: Mapping[str, Any],
    path: str | Path | None = None,
    n_bins: int = 10,
    suptitle: str | None = None,
) -> Figure:
    r"""
    Draw several reliability diagrams side by side, e.g. before and after calibration-aware fine-tuning.

    Args:
        panels (`dict[str, Any]`):
            One entry per panel, in order: the panel title mapped to either the output of
            `calib_trl.metrics.reliability_diagram_data` or a `(confidences, correct)` pair, e.g.
            `{"base": base_data, "CogCalib": (confidences, correct)}`.
        path (`str` or `os.PathLike`, *optional*):
            Where to save the figure (PNG at 120 dpi unless the suffix names another format); parent directories are
            created.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of equal-width bins for the panels given as `(confidences, correct)`.
        suptitle (`str`, *optional*):
            Title of the whole figure.

    Returns:
        `matplotlib.figure.Figure`: The figure, with one axes per panel.
    """
    if not isinstance(panels, Mapping) or len(panels) == 0:
        raise ValueError("`panels` must be a non-empty dict mapping panel titles to diagram data.")
    figure = _new_figure(4.2 * len(panels), 4.6)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, panel) in zip(axes, panels.items()):
        where = f"panel {name!r}"
        if isinstance(panel, Mapping):
            data = _resolve_data(panel, None, None, n_bins, where)
        elif isinstance(panel, (tuple, list)) and len(panel) == 2:
            data = _resolve_data(None, panel[0], panel[1], n_bins, where)
        else:
            raise ValueError(
                f"{where}: expected the dict of `reliability_diagram_data` or a `(confidences, correct)` pair."
            )
        _draw(ax, data, str(name))
    if suptitle is not None:
        figure.suptitle(suptitle)
    if path is not None:
        _save(figure, path)
    return figure
