"""Ablation report of sweep records: every row against one reference recipe on the same windows.

A row is one recipe that switches one design element off: where the row and the reference are both
kakeya configs (presets or generated names) the report names the fields that differ, otherwise it
shows the row's recipe description. It states its bytes and quality and how its KL and top-1
compare with the reference's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.plots import pyplot, save_figure
from kakeyaturbo.evaluation.report import check_record, markdown_grid, thresholds_note

_HEADERS = ("recipe", "what changes", "bits/elem", "ratio", "Δppl % [95 % CI]", "KL", "KL vs ref", "top-1 %",
            "Δtop-1 pts", "verdict")
_RIGHT = (False, False, True, True, True, True, True, True, True, False)


def _fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``{field: value}`` of a dataclass, nested dataclasses as ``outer.inner``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out.update(_fields(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                   else {prefix + f.name: value})
    return out


def _description(record: dict[str, Any], reference: dict[str, Any]) -> str:
    """What the row changes: the KakeyaConfig fields that differ from the reference's (both kakeya
    configs), else the row's recipe description, or '' if it cannot be read."""
    from kakeyaturbo import recipes
    from kakeyaturbo.recipes.kakeya import config_for

    source, ref_source = (r.get("cell", {}).get("recipe", r["recipe"]) for r in (record, reference))
    try:
        row, ref = _fields(config_for(source)), _fields(config_for(ref_source))
        return "; ".join(f"{k}: {ref[k]!r} -> {v!r}" for k, v in row.items() if v != ref[k]).replace("|", "/")
    except ConfigError:
        pass
    try:
        return recipes.load(source).description.replace("|", "/")
    except (ConfigError, OSError):
        return ""


def _split(records: list[dict[str, Any]], reference: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    for i, r in enumerate(records):
        check_record(r, f"records[{i}]")
    refs = [r for r in records if r["recipe"] == reference]
    if len(refs) != 1:
        raise ConfigError(f"ablation: need exactly one record of the reference recipe {reference!r}, "
                          f"found {len(refs)} among {sorted({r['recipe'] for r in records})}")
    if len({(r["ctx"], r["windows"], r["mode"], r["n_eval"]) for r in records}) != 1:
        raise ConfigError("ablation: every record must come from the same ctx, windows, n_eval and mode")
    return refs[0], [r for r in records if r["recipe"] not in (reference, "exact")]


def ablation_table(records: list[dict[str, Any]], reference: str) -> str:
    """Markdown: the reference row, then one row per ablation, with KL and top-1 relative to the reference.

    Args:
        records: sweep records of one (ctx, windows, n_eval, mode); `exact` rows are skipped.
        reference: recipe name of the full design.

    Raises:
        ConfigError: no single reference record, mixed settings, or a record lacking a field.
    """
    ref, rows = _split(records, reference)
    cells = []
    for r in [ref, *rows]:
        lo, hi = r["delta_ppl_ci95"]
        kl_rel = "1.00x" if r is ref else f"{r['kl'] / ref['kl']:.2f}x" if ref["kl"] > 0 else "n/a"
        what = "reference: every element on" if r is ref else _description(r, ref)
        cells.append((r["recipe"], what, f"{r['bits_per_element']:.2f}", f"{r['ratio']:.2f}x",
                      f"{r['delta_ppl_pct']:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{r['kl']:.4f}", kl_rel,
                      f"{r['top1_pct']:.1f}", f"{r['top1_pct'] - ref['top1_pct']:+.1f}", r["verdict"]))
    table = markdown_grid(_HEADERS, _RIGHT, cells)
    note = (f"{ref['tokens_scored']} scored predictions per row ({ref['windows']} windows, ctx {ref['ctx']}, "
            f"{ref['mode']}), the same windows for every row.")
    return table + "\n\n" + note + " " + thresholds_note() + "\n"


def ablation_plot(records: list[dict[str, Any]], reference: str, path: str | Path) -> Path:
    """Write a PNG: KL (log) and top-1 agreement per ablation row, the reference drawn as a line."""
    plt = pyplot()
    ref, rows = _split(records, reference)
    names = [r["recipe"] for r in rows]
    pos = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    for ax, key, label, log in ((axes[0], "kl", "KL(p_ref ‖ p_alt) [nats]", True),
                                (axes[1], "top1_pct", "top-1 agreement [%]", False)):
        vals = np.array([float(r[key]) for r in rows])
        worse = vals > ref[key] if key == "kl" else vals < ref[key]
        ax.barh(pos, vals, color=np.where(worse, "tab:red", "tab:green"), zorder=3)
        ax.axvline(float(ref[key]), color="k", ls="--", lw=1, label=f"{reference}: {ref[key]:.4g}")
        if log:
            ax.set_xscale("log")
        else:
            ax.set_xlim(min(float(vals.min()), float(ref[key])) - 3, 100)
        ax.set_xlabel(label)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_yticks(pos, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"ablation vs {reference} ({ref['windows']} windows, ctx {ref['ctx']}, {ref['mode']}); "
                 "red: worse than the reference", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
