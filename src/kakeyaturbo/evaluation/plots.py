"""Pareto plots of sweep records: KL and |Δppl| against bits per element, one line per codec family.

matplotlib (the ``eval`` extra) is imported only when a plot is drawn, with the Agg backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.metrics import THRESHOLDS
from kakeyaturbo.evaluation.report import check_record
from kakeyaturbo.recipes.kakeya import PRESETS

KAKEYA_PREFIXES = ("kakeya", "v1.")
SHIPPED = tuple(PRESETS)
_BUDGET_SUFFIXES = ((r"^kakeya-k[\d.]+-v[\d.]+b(?=-|$)", "kakeya-kv*b"), (r"^kakeya-[\d.]+b(?=-|$)", "kakeya-*b"),
                    (r"-\d+(-v)$", r"\1"), (r"-\d+$", ""),
                    (r"(int)\d+$", r"\1"))
_BIT_TICKS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
_OUR_COLOURS = (0, 1, 2, 3, 4, 5, 6, 8, 9)  # tab10 without its grey (the seed's points and the front are grey)
_OUR_MARKERS = ("s", "^", "v", "P")  # after every len(_OUR_COLOURS) families, the next marker
_RATIO_TICKS = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)
_LABEL_ANGLES = tuple(math.radians(a) for a in (45, -45, 135, -135, 0, 180, 90, -90))
_LABEL_RINGS = (6.0, 16.0, 30.0, 48.0, 70.0)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when maximising ``x`` and minimising ``y``.

    A point is dominated if another has ``x`` at least as large and ``y`` at least as small, one
    of them strictly. Points with a NaN coordinate are never on the front. Equal points are all
    kept. The indices are returned sorted by increasing ``x`` (then increasing ``y``).
    """
    if len(points) == 0:
        return []
    p = np.asarray(points, dtype=np.float64).reshape(len(points), 2)
    x, y = p[:, 0], p[:, 1]
    ok = ~np.isnan(p).any(axis=1)
    ge = (x[None, :] >= x[:, None]) & (y[None, :] <= y[:, None])
    strict = (x[None, :] > x[:, None]) | (y[None, :] < y[:, None])
    dominated = (ge & strict & ok[None, :]).any(axis=1)
    front = np.flatnonzero(ok & ~dominated)
    return [int(i) for i in front[np.lexsort((y[front], x[front]))]]


def is_kakeya(recipe: str) -> bool:
    """Whether a recipe is one of KakeyaTurbo's (name starts with ``kakeya`` or ``v1.``)."""
    return recipe.startswith(KAKEYA_PREFIXES)


def family(recipe: str) -> str:
    """The codec family of a recipe: its name with the budget suffix stripped.

    ``turboquant-3`` -> ``turboquant``, ``rotated-int8`` -> ``rotated-int``,
    ``rotated-int8-k-turboquant-3-v`` -> ``rotated-int8-k-turboquant-v``, generated kakeya names
    ``kakeya-2.5b-head`` -> ``kakeya-*b-head``, ``kakeya-k3-v2.5b-refl0`` -> ``kakeya-kv*b-refl0``; the
    seed's ``v1.*`` ladder is one family, ``seed v1.x``; a name without a budget suffix (``fp8``,
    ``kakeya-max``) is its own family.
    """
    if recipe.startswith("v1."):
        return "seed v1.x"
    for pattern, repl in _BUDGET_SUFFIXES:
        stripped = re.sub(pattern, repl, recipe)
        if stripped != recipe:
            return stripped
    return recipe


def _positive(y: np.ndarray) -> tuple[np.ndarray, float]:
    """``y`` with zeros lifted to a floor below the smallest positive value, for log axes."""
    pos = y[y > 0]
    floor = float(pos.min()) / 10.0 if pos.size else 1e-6
    return np.where(y > 0, y, floor), floor


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a 120-dpi PNG at ``path`` (parents created), close it, return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return out


def _bits_ratio(v: Any) -> Any:
    """``16 / v``: bits per element to ratio vs bf16 and back (0 kept finite for matplotlib's probes)."""
    return 16.0 / np.maximum(np.asarray(v, dtype=np.float64), 1e-9)


def _overlaps(box: Any, others: list[Any]) -> bool:
    return any(box.overlaps(o) for o in others)


def _place_labels(ax: Any, points: list[tuple[float, float, str]], obstacles: list[Any]) -> None:
    """Annotate ``points`` ((x, y, text) in data coordinates, in priority order) greedily: each label
    takes the first candidate offset (8 directions, growing distances, a leader line beyond the
    nearest ring) whose box stays inside the axes and overlaps no label placed before it, and avoids
    the marker boxes in ``obstacles`` where it can. A label with no free place is left out."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for x, y, text in points:
        candidates = [(d * math.cos(a), d * math.sin(a)) for d in _LABEL_RINGS for a in _LABEL_ANGLES]
        chosen = None
        for avoid_markers in (True, False):
            for dx, dy in candidates:
                ann = ax.annotate(
                    text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8.5,
                    ha="left" if dx > 1 else "right" if dx < -1 else "center",
                    va="bottom" if dy > 1 else "top" if dy < -1 else "center",
                    arrowprops={"arrowstyle": "-", "color": "0.45", "lw": 0.6} if math.hypot(dx, dy) > 10 else None,
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=5)
                box = ann.get_window_extent(renderer).expanded(1.02, 1.05)
                inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                if inside and not _overlaps(box, placed) and not (avoid_markers and _overlaps(box, obstacles)):
                    chosen = box
                    break
                ann.remove()
            if chosen is not None:
                break
        if chosen is not None:
            placed.append(chosen)


def _marker_boxes(ax: Any, xs: np.ndarray, ys: np.ndarray, half: float = 3.5) -> list[Any]:
    """Display-coordinate boxes (``half`` pixels each side) around the data points ``(xs, ys)``."""
    from matplotlib.transforms import Bbox

    pix = ax.transData.transform(np.column_stack([xs, ys]))
    return [Bbox([[px - half, py - half], [px + half, py + half]]) for px, py in pix]


def pareto_figure(records: list[dict[str, Any]]) -> Any:
    """Draw the Pareto plot of ``records`` and return the matplotlib figure (not saved).

    One row of two panels per (mode, ctx, windows) present: KL(p_ref ‖ p_alt) and |Δppl| % (log
    y) against bits per element (log x, ``16 / ratio`` for a bf16 reference; the ratio on the top
    axis). Records at 16 bits or more (the exact reference) are left out. Each codec family
    (:func:`family`) is one line through its points sorted by bits (baselines dashed with circles,
    KakeyaTurbo solid with squares; the seed's ladder points only); the shipped recipes
    (:data:`SHIPPED`) are gold stars. The Pareto front of each panel (fewest bits, least error) is a
    grey staircase from the fewest to the most bits measured. Only front points and shipped
    recipes are labelled (:func:`_place_labels`); the Δppl panels show the ACCEPT and MARGINAL
    thresholds. Values of exactly 0 are drawn at a floor below the smallest positive value.

    Raises:
        ConfigError: no records, or a record lacking a contract field.
    """
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    plt = pyplot()
    if not records:
        raise ConfigError("pareto_plot needs at least one record, got none")
    for i, r in enumerate(records):
        check_record(r, f"records[{i}]")
    drawn = [r for r in records if float(r["bits_per_element"]) < 16.0] or records
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in sorted(drawn, key=lambda r: (r["mode"], r["ctx"], r["windows"])):
        groups.setdefault((r["mode"], r["ctx"], r["windows"]), []).append(r)
    names = sorted({family(r["recipe"]) for r in drawn if r["recipe"] not in SHIPPED},
                   key=lambda f: (is_kakeya(f), f))
    baselines = [f for f in names if not is_kakeya(f)]
    ours = [f for f in names if is_kakeya(f) and not f.startswith("seed")]
    colours = {f: plt.get_cmap("Dark2")(i % 8) for i, f in enumerate(baselines)}
    colours.update({f: plt.get_cmap("tab10")(_OUR_COLOURS[i % len(_OUR_COLOURS)]) for i, f in enumerate(ours)})
    markers = {f: _OUR_MARKERS[i // len(_OUR_COLOURS) % len(_OUR_MARKERS)] for i, f in enumerate(ours)}
    colours["seed v1.x"] = "0.6"
    # legend columns as wide as the longest family name (about 0.066 in a character at 9 pt, plus the
    # handle) in the figure's 14 inches; under the panels: the x label, the legend title and its rows
    ncol = max(1, min(4, int(13.5 // (0.066 * max(map(len, names)) + 0.7))))
    legend = 0.8 + 0.22 * math.ceil((len(names) + 4) / ncol)
    height = 5.6 * len(groups) + legend
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, height), squeeze=False)
    fig.subplots_adjust(left=0.065, right=0.985, bottom=legend / height, top=1 - 0.75 / height, wspace=0.16,
                        hspace=0.42)
    bits_all = np.array([float(r["bits_per_element"]) for r in drawn])
    lo, hi = float(bits_all.min()), float(bits_all.max())
    pad = max(1.12, math.sqrt(2.0 * lo / hi))  # at least a factor 2 wide, so that ticks show
    xlim = (lo / pad, hi * pad)
    for row, ((mode, ctx, windows), recs) in zip(axes, groups.items()):
        bits = np.array([float(r["bits_per_element"]) for r in recs])
        recipe = [r["recipe"] for r in recs]
        panels = (("KL(p_ref ‖ p_alt) [nats]", np.array([float(r["kl"]) for r in recs])),
                  ("|Δppl| [%]", np.abs(np.array([float(r["delta_ppl_pct"]) for r in recs]))))
        for ax, (ylabel, raw) in zip(row, panels):
            y, floor = _positive(raw)
            for name in names:
                idx = [i for i, n in enumerate(recipe) if n not in SHIPPED and family(n) == name]
                if not idx:
                    continue
                idx.sort(key=lambda i: (bits[i], y[i]))
                seed, base = name.startswith("seed"), not is_kakeya(name)
                ax.plot(bits[idx], y[idx], ls="none" if seed else "--" if base else "-",
                        marker="D" if seed else "o" if base else markers[name], ms=4 if base else 3.5, lw=1.2,
                        color=colours[name], label=name, zorder=3)
            shipped = [i for i, n in enumerate(recipe) if n in SHIPPED]
            if shipped:
                ax.plot(bits[shipped], y[shipped], ls="none", marker="*", ms=15, mfc="gold", mec="black",
                        mew=0.8, label="shipped recipe", zorder=4)
            front = sorted(pareto_front(list(zip(-bits, raw))), key=lambda i: (bits[i], y[i]))
            fx = np.append(bits[front], xlim[1])
            fy = np.append(y[front], y[front][-1])
            ax.step(fx, fy, where="post", color="0.3", lw=2.2, alpha=0.35, label="Pareto front", zorder=2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(*xlim)
            ax.xaxis.set_major_locator(FixedLocator([t for t in _BIT_TICKS if xlim[0] <= t <= xlim[1]]))
            ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            top = ax.secondary_xaxis("top", functions=(_bits_ratio, _bits_ratio))
            top.xaxis.set_major_locator(FixedLocator(_RATIO_TICKS))
            top.xaxis.set_major_formatter(lambda v, _: f"{v:g}×")
            top.xaxis.set_minor_locator(NullLocator())
            top.set_xlabel("compression ratio vs bf16", fontsize=8)
            ax.set_xlabel("bits per element (16 / ratio)")
            ax.set_ylabel(ylabel + (f" (0 drawn at {floor:.1e})" if (raw <= 0).any() else ""))
            ax.set_title(f"{mode}, ctx {ctx}, {windows} windows", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ylabel.startswith("|Δppl|"):
                for label, style in (("ACCEPT", ":"), ("MARGINAL", "-.")):
                    level = THRESHOLDS[label]["abs_delta_ppl_pct"]
                    ax.axhline(level, ls=style, color="tab:red", lw=1, label=f"{label} |Δppl| ≤ {level:g} %")
            fig.canvas.draw()
            labels: dict[tuple[float, float], str] = {}
            for i in shipped + front:  # shipped first: a front point equal to a shipped one keeps its name
                labels.setdefault((float(bits[i]), float(y[i])), recipe[i])
            _place_labels(ax, [(x0, y0, t) for (x0, y0), t in labels.items()], _marker_boxes(ax, bits, y))
    handles, texts = [], []
    for ax in axes.flat:
        for h, t in zip(*ax.get_legend_handles_labels()):
            if t not in texts:
                handles.append(h)
                texts.append(t)
    fig.legend(handles, texts, loc="lower center", ncol=ncol, fontsize=9, frameon=False,
               title="codec family: one line through its points sorted by bits (dashed: baselines)",
               title_fontsize=9)
    return fig


def pareto_plot(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`pareto_figure` of ``records`` as a PNG at ``path`` and return the path.

    Raises:
        ConfigError: no records, or a record lacking a contract field.
    """
    return save_figure(pareto_figure(records), path)


def layer_bits_plot(bits: list[list[float | None]], title: str, path: str | Path) -> Path:
    """Write a PNG: the K and V bits of every layer (``[[k, v], ...]``, None for streams without a
    ``bits`` setting, drawn as gaps), as grouped bars with each stream's mean as a line."""
    plt = pyplot()
    arr = np.array([[np.nan if b is None else float(b) for b in layer] for layer in bits], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or not len(arr):
        raise ConfigError(f"layer_bits_plot: need [[k_bits, v_bits], ...] per layer, got {bits!r}")
    fig, ax = plt.subplots(figsize=(11.5, 3.6))
    x = np.arange(len(arr))
    for col, (name, colour) in enumerate((("K", "tab:blue"), ("V", "tab:orange"))):
        ax.bar(x + (col - 0.5) * 0.4, arr[:, col], width=0.4, label=f"{name} (mean {np.nanmean(arr[:, col]):.2f})",
               color=colour)
    ax.axhline(float(np.nanmean(arr)), color="black", linestyle="--", linewidth=1,
               label=f"mean {np.nanmean(arr):.3f} bits/elem")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per element")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    fig.tight_layout()
    return save_figure(fig, path)
