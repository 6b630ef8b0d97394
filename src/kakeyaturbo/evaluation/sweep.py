"""Resumable sweeps over evaluation cells described by a JSON or TOML grid file.

A grid file holds ``defaults`` (merged into every cell), explicit ``cells`` and/or a cartesian
``grid`` (every combination of its lists), for example::

    {"defaults": {"ctx": 1024, "n_eval": 128, "windows": 8, "mode": "snapshot"},
     "cells": [{"recipe": "turboquant-3"}, {"recipe": "kakeya-balanced", "ctx": 2048}],
     "grid": {"recipe": ["kivi-2", "kakeya-max"], "mode": ["snapshot", "streaming"]}}

A cell (or ``defaults`` / ``grid``) may also carry :class:`~kakeyaturbo.recipes.KakeyaConfig` field
names (``bits``, ``v_bits``, ``layout``, ``coding``, ``head_gain_bits``, ``reflector_bits``,
``layer_bits``, ``sink_tokens``, ...): they override that field of the config the cell's ``recipe``
names (a preset such as ``kakeya-balanced`` or a generated name such as ``kakeya-3b-head``), and the
cell's recipe becomes the generated name of the result, e.g.::

    {"grid": {"recipe": ["kakeya-balanced"], "bits": [1.5, 2, 2.5, 3], "layout": ["head", "joint"]}}

runs ``kakeya-1.5b-head-probe-head``, ``kakeya-1.5b-probe-head``, ... ``kakeya-3b-probe-head``.

Each cell gets a stable key (hash of its canonical JSON, overrides already applied). Finished
cells' records are appended to ``out_dir/results.jsonl`` one whole line at a time (flush +
fsync), so a killed sweep resumes where it stopped: finished keys are skipped and a partial
trailing line is dropped. Cells that differ only in ``recipe``/``calibration`` form a group and go
to ``evaluate`` together, so that one reference pass serves several recipes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kakeyaturbo.errors import ConfigError, CorruptDataError, KakeyaError
from kakeyaturbo.evaluation.ablation import ablation_plot, ablation_table
from kakeyaturbo.evaluation.plots import pareto_plot
from kakeyaturbo.evaluation.report import MODES, check_record, markdown_table
from kakeyaturbo.recipes.kakeya import KakeyaConfig, config_for

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

Cell = dict[str, Any]
Evaluate = Callable[[list[Cell]], Cell | list[Cell]]

CELL_DEFAULTS: Cell = {
    "model": "smollm2-135m", "text": "austen", "ctx": 1024, "n_eval": 128, "windows": 8, "mode": "snapshot",
}
_STR_KEYS = ("model", "text", "recipe", "calibration", "device")
_INT_KEYS = ("ctx", "n_eval", "windows", "seed")
CELL_KEYS = frozenset(_STR_KEYS + _INT_KEYS + ("mode",))
OVERRIDE_KEYS = frozenset(f.name for f in dataclasses.fields(KakeyaConfig)) - {"probe"}
"""KakeyaConfig fields a cell may override (checked when the config is built)."""
PER_CELL_KEYS = ("recipe", "calibration")
TOP_KEYS = frozenset({"defaults", "cells", "grid"})
RESULTS = "results.jsonl"


def _check_cell(cell: Mapping[str, Any], where: str) -> None:
    for k, v in cell.items():
        if k in OVERRIDE_KEYS:
            continue
        if k not in CELL_KEYS:
            raise ConfigError(f"{where}: unknown key {k!r}; known: {sorted(CELL_KEYS)} and the KakeyaConfig "
                              f"fields {sorted(OVERRIDE_KEYS)}")
        if k in _STR_KEYS and (not isinstance(v, str) or not v):
            raise ConfigError(f"{where}: key {k!r} must be a non-empty string, got {v!r}")
        lo = 0 if k == "seed" else 1
        if k in _INT_KEYS and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ConfigError(f"{where}: key {k!r} must be an integer >= {lo}, got {v!r}")
        if k == "mode" and v not in MODES:
            raise ConfigError(f"{where}: key 'mode' must be one of {list(MODES)}, got {v!r}")


def _apply_overrides(cell: Cell, where: str) -> Cell:
    """``cell`` with its KakeyaConfig field overrides applied to its recipe: the recipe becomes the
    overridden config's generated name and the override keys are dropped (a cell without them is returned as is).

    Raises:
        ConfigError: naming ``where``: the recipe is not of the kakeya family, or an override is invalid.
    """
    overrides = {k: v for k, v in cell.items() if k in OVERRIDE_KEYS}
    if not overrides:
        return cell
    try:
        base = config_for(cell["recipe"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: recipe {cell['recipe']!r} is not of the kakeya family (a preset or a generated "
                          f"kakeya name), so it takes no field overrides {sorted(overrides)}: {exc}") from None
    try:
        name = dataclasses.replace(base, **overrides).name
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: overriding {overrides} of {cell['recipe']!r}: {exc}") from None
    return {**{k: v for k, v in cell.items() if k not in OVERRIDE_KEYS}, "recipe": name}


def _read_grid_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(f"grid file {path} must end in .json or .toml")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read grid file {path}: {e}") from e
    if suffix == ".toml":
        if tomllib is None:
            raise ConfigError(f"grid file {path}: TOML needs Python >= 3.11 (tomllib); use a .json grid file")
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"grid file {path} is not valid TOML: {e}") from e
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"grid file {path} is not valid JSON: {e}") from e


def expand_grid(spec: Mapping[str, Any]) -> list[Cell]:
    """Expand a parsed grid spec into full cells (defaults merged, KakeyaConfig field overrides applied
    to their recipe), duplicates removed, in order: explicit ``cells`` first, then the cartesian ``grid``
    in row-major order of its keys.

    Raises:
        ConfigError: naming the bad key (unknown key, wrong type, empty list, missing recipe, an override
            of a recipe outside the kakeya family or an invalid override, ...).
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"grid must be an object with keys {sorted(TOP_KEYS)}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"grid: unknown top-level key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    defaults = spec.get("defaults", {})
    cells = spec.get("cells", [])
    grid = spec.get("grid", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError("grid: 'defaults' must be an object")
    if not isinstance(cells, list) or not all(isinstance(c, Mapping) for c in cells):
        raise ConfigError("grid: 'cells' must be a list of objects")
    if not isinstance(grid, Mapping):
        raise ConfigError("grid: 'grid' must be an object of lists")
    _check_cell(defaults, "defaults")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid: key {k!r} must be a non-empty list")
        for v in values:
            _check_cell({k: v}, "grid")
    base = {**CELL_DEFAULTS, **defaults}
    out = [{**base, **c} for c in cells]
    keys = list(grid)
    if keys:
        out += [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))]
    if not out:
        raise ConfigError("grid: needs at least one entry in 'cells' or a non-empty 'grid'")
    unique: dict[str, Cell] = {}
    for i, cell in enumerate(out):
        _check_cell(cell, f"cell {i}")
        if "recipe" not in cell:
            raise ConfigError(f"cell {i}: key 'recipe' is required (in the cell, 'defaults' or 'grid')")
        cell = _apply_overrides(cell, f"cell {i}")
        unique.setdefault(cell_key(cell), cell)
    return list(unique.values())


def load_grid(path: str | Path) -> list[Cell]:
    """Read a ``.json`` or ``.toml`` grid file and expand it with :func:`expand_grid`."""
    return expand_grid(_read_grid_file(Path(path)))


def cell_key(cell: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit key of a cell: SHA-256 of its canonical JSON (sorted keys, no spaces)."""
    canon = json.dumps(cell, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def group_cells(cells: list[Cell]) -> list[list[Cell]]:
    """Group cells that share everything but their per-recipe keys (:data:`PER_CELL_KEYS`),
    keeping first-appearance order of groups and of cells within a group."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        shared = {k: v for k, v in cell.items() if k not in PER_CELL_KEYS}
        groups.setdefault(cell_key(shared), []).append(cell)
    return list(groups.values())


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of ``results.jsonl``, truncating a partial trailing line left by a killed run.

    Raises:
        CorruptDataError: a complete line that is not a JSON object with a ``cell_key``.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].splitlines(), start=1):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptDataError(f"{path}: line {n} is not valid JSON: {e}") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("cell_key"), str):
            raise CorruptDataError(f"{path}: line {n} is not a record with a 'cell_key'")
        records.append(rec)
    return records


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a single JSON line, flushed and fsynced before returning."""
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    with path.open("ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _checked(result: Any, group: list[Cell]) -> list[dict[str, Any]]:
    """``evaluate``'s output as one contract-complete record per cell, in the group's order."""
    records = [result] if isinstance(result, dict) else result
    if not isinstance(records, list) or len(records) != len(group):
        got = len(records) if isinstance(records, list) else type(records).__name__
        raise KakeyaError(f"evaluate must return one record per cell of its group ({len(group)}), got {got}")
    for cell, rec in zip(group, records):
        check_record(rec, f"record of cell {cell_key(cell)} ({cell['recipe']})")
        if cell["recipe"] not in (rec["recipe"], rec.get("recipe_source")):
            raise KakeyaError(f"evaluate returned a record for recipe {rec['recipe']!r} where the cell "
                              f"asks for {cell['recipe']!r} (records must follow the cells' order)")
    return records


def run_sweep(
    grid_path: str | Path,
    out_dir: str | Path,
    evaluate: Evaluate | None,
    *,
    progress: bool = True,
    ablation_reference: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every cell of a grid file not yet in ``out_dir/results.jsonl``; write the table and plot.

    Args:
        grid_path: ``.json`` or ``.toml`` grid file (see the module docstring).
        out_dir: output folder; gets ``results.jsonl``, ``table.md`` and ``pareto.png``.
        evaluate: called with the pending cells of one group (a list of full cell dicts sharing
            model, text, ctx, n_eval, windows, mode, ...) and returning one ``kakeya eval`` record
            per cell, in the same order, each echoing its cell's ``recipe`` (a bare dict is
            accepted for a one-cell group).
        progress: show a tqdm bar over cells.
        ``evaluate=None`` evaluates nothing: the table and plot are written from the finished cells.
        ablation_reference: if set, also write ``ablation.md`` and ``ablation.png``: every record
            against this recipe's (see :mod:`kakeyaturbo.evaluation.ablation`).

    Returns:
        The records of this grid's cells, in grid order, each with ``cell_key`` and ``cell`` added.
    """
    cells = load_grid(grid_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    done = {r["cell_key"]: r for r in read_results(results)}
    pending = [c for c in cells if cell_key(c) not in done]
    with tqdm(total=len(cells), initial=len(cells) - len(pending), desc="sweep", unit="cell",
              disable=not progress or evaluate is None) as bar:
        for group in group_cells(pending) if evaluate is not None else []:
            for cell, rec in zip(group, _checked(evaluate([dict(c) for c in group]), group)):
                key = cell_key(cell)
                rec = {**rec, "cell_key": key, "cell": cell}
                append_record(results, rec)
                done[key] = rec
                bar.update(1)
    records = [done[cell_key(c)] for c in cells if cell_key(c) in done]
    _write_atomic(out / "table.md", markdown_table(records))
    os.replace(pareto_plot(records, out / "pareto.tmp.png"), out / "pareto.png")
    if ablation_reference is not None:
        _write_atomic(out / "ablation.md", ablation_table(records, ablation_reference))
        os.replace(ablation_plot(records, ablation_reference, out / "ablation.tmp.png"), out / "ablation.png")
    return records
