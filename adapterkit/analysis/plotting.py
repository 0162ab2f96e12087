"""``plot``: a PNG of an :func:`~adapterkit.analysis.spectra.inspect` report, for choosing ``--rank`` at a glance.

matplotlib is an optional dependency (``adapterkit[plot]``), imported only when a plot is drawn,
so that nothing else in adapterkit pays for it. The figure is drawn on a bare Agg canvas rather
than through ``pyplot``: no global backend is switched and no window can open, which keeps the
function safe in servers, notebooks and tests alike.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterkit.errors import InvalidInputError

__all__ = ["layer_and_type", "plot"]

#: A layer index is the first dotted component that is a number (``model.layers.12.self_attn.q_proj``).
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
#: How many individual modules get their own energy curve beside the model's.
_CURVES = 4
#: Heat maps with at most this many cells get their values written in.
_ANNOTATED_CELLS = 96


def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or a clear error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InvalidInputError(
            "plotting needs matplotlib, which is not installed; install adapterkit[plot] "
            "(pip install 'adapterkit[plot]')"
        ) from None
    return Figure, FigureCanvasAgg


def layer_and_type(name: str) -> tuple[int | None, str]:
    """``(layer index, module type)`` for a module path: ``model.layers.3.mlp.up_proj`` -> ``(3, "mlp.up_proj")``.

    The type is what follows the index, so the same projection in every layer lines up in one
    row of the heat map; a module outside the repeated layers (``lm_head``) has no index.
    """
    match = _LAYER.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end() :]


def _heat_values(report: Mapping[str, Any]) -> tuple[dict[str, float], str]:
    """One number per module for the heat map: mean pairwise cosine (2+ adapters), else the delta's norm."""
    interference = report.get("interference")
    if interference:
        sums: dict[str, list[float]] = {}
        for pair in interference["pairs"]:
            for name, entry in pair["modules"].items():
                if entry["cosine"] is not None:
                    sums.setdefault(name, []).append(entry["cosine"])
        return {name: sum(v) / len(v) for name, v in sums.items()}, "mean pairwise cosine"
    adapter = report["adapters"][0]
    return {name: entry["frobenius_norm"] for name, entry in adapter["modules"].items()}, "Frobenius norm of delta"


def plot(report: Mapping[str, Any], path: str | os.PathLike[str], *, modules: int = _CURVES) -> Path:
    """Write a PNG of ``report`` (from ``inspect(..., rank_curve=True)``) to ``path``; returns the path.

    Left: energy kept versus rank for the model (one rank shared by every module) and for the
    ``modules`` modules with the most energy, with the 90/95/99% marks. Right: a heat map with
    module types as rows and layers as columns, of the mean pairwise cosine of the weighted
    deltas for two or more adapters (red: aligned, blue: opposed), or of each module's delta norm
    for one adapter.
    """
    if report.get("not_computed"):  # a DoRA adapter: no energy curve and no interference to draw
        raise InvalidInputError(f"nothing to plot: {report['not_computed']}")
    energy = report.get("energy") or {}
    if "curve" not in energy.get("overall", {}):
        raise InvalidInputError("the report has no energy curves; make it with inspect(..., rank_curve=True)")
    Figure, FigureCanvasAgg = _matplotlib()

    figure = Figure(figsize=(13, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.3])
    _draw_energy(left, energy, modules)
    _draw_heat(figure, right, report)
    n = len(report.get("adapters", []))
    figure.suptitle(f"{n} adapter{'s' if n != 1 else ''}, weights {report.get('weights')}")
    out = Path(path)
    figure.savefig(out, format="png")
    return out


def _draw_energy(axes: Any, energy: Mapping[str, Any], count: int) -> None:
    overall = energy["overall"]["curve"]
    ranks = range(1, len(overall) + 1)
    axes.plot(ranks, overall, color="black", linewidth=2.2, label="model (one rank for all modules)")
    by_energy = sorted(energy["modules"].items(), key=lambda item: -item[1]["frobenius_norm"])
    for name, entry in by_energy[:count]:
        curve = entry.get("curve") or []
        axes.plot(range(1, len(curve) + 1), curve, linewidth=1, alpha=0.8, label=name)
    for threshold in energy.get("thresholds", []):
        axes.axhline(threshold, color="grey", linestyle=":", linewidth=0.8)
        k = energy["overall"]["ranks_for_energy"].get(format(threshold, "g"))
        if k:
            axes.annotate(
                f"{threshold:g}: r={k}", (k, threshold), fontsize=7, xytext=(4, -10), textcoords="offset points"
            )
    axes.set_xlabel("rank of the truncated weighted sum")
    axes.set_ylabel("fraction of energy kept (sum of squared singular values)")
    axes.set_ylim(0, 1.02)
    axes.set_xlim(left=1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    axes.set_title("energy versus rank")


def _draw_heat(figure: Any, axes: Any, report: Mapping[str, Any]) -> None:
    values, label = _heat_values(report)
    placed = [(layer_and_type(name), value) for name, value in values.items()]
    layers = sorted({layer for (layer, _), _ in placed if layer is not None})
    columns: list[int | None] = [*layers, *([None] if any(layer is None for (layer, _), _ in placed) else [])]
    types = sorted({kind for (_, kind), _ in placed})
    grid = [[math.nan] * len(columns) for _ in types]
    for (layer, kind), value in placed:
        grid[types.index(kind)][columns.index(layer)] = value
    if not types:
        axes.text(0.5, 0.5, "no module shared by two adapters", ha="center", va="center")
        axes.set_axis_off()
        return
    if report.get("interference"):
        # Cosines of real adapters are usually small: a scale symmetric about the largest |cosine| (not ±1)
        # keeps them visible, and the diverging map keeps aligned (red) and opposed (blue) apart.
        limit = max((abs(v) for v in values.values()), default=0.0) or 1.0
        image = axes.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    else:
        image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if len(types) * len(columns) <= _ANNOTATED_CELLS:
        for row, cells in enumerate(grid):
            for column, value in enumerate(cells):
                if not math.isnan(value):
                    axes.text(column, row, f"{value:.2g}", ha="center", va="center", fontsize=7)
    axes.set_yticks(range(len(types)), types, fontsize=7)
    step = max(1, len(columns) // 24)
    ticks = list(range(0, len(columns), step))
    axes.set_xticks(ticks, ["other" if columns[i] is None else str(columns[i]) for i in ticks], fontsize=7)
    axes.set_xlabel("layer")
    axes.set_title(label + " per module")
    figure.colorbar(image, ax=axes, label=label)
