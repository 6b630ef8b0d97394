"""The ``kakeya eval --json`` record and its terminal / Markdown tables.

A record is a plain JSON-compatible dict. Its byte fields come from bytes actually stored
(``Encoded.nbytes`` summed by the caller); ``ratio`` and ``bits_per_element`` are derived from
them here so that they can never disagree: ``ratio = bytes_bf16 / bytes_compressed`` and
``bits_per_element = 16 / ratio`` (bf16 stores 16 bits per element).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.metrics import THRESHOLDS, Summary, verdict

MODES = ("snapshot", "streaming")
SECONDS_KEYS = ("prefill", "encode", "decode")
CONTRACT_FIELDS = (
    "model", "text", "recipe", "mode", "ctx", "n_eval", "windows", "tokens_scored",
    "bytes_compressed", "bytes_bf16", "ratio", "bits_per_element", "bytes_model",
    "ppl_ref", "ppl", "delta_ppl_pct", "delta_ppl_ci95", "kl", "kl_ci95", "top1_pct",
    "verdict", "thresholds", "seconds",
)
HEADERS = ("recipe", "mode", "ctx", "ratio", "bits/elem", "model MB", "Δppl % [95% CI]", "KL [95% CI]",
           "top-1 %", "verdict")
_RIGHT = (False, False, True, True, True, True, True, True, True, False)


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")


def result_record(
    *,
    model: str,
    text: str,
    recipe: str,
    mode: str,
    ctx: int,
    n_eval: int,
    summary: Summary,
    bytes_compressed: int,
    bytes_bf16: int,
    bytes_model: int,
    seconds: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one ``kakeya eval --json`` object.

    Args:
        model, text, recipe: names as the user typed them (or resolved paths).
        mode: ``"snapshot"`` or ``"streaming"``.
        ctx, n_eval: context length and tokens evaluated per window.
        summary: pooled metrics from :func:`~kakeyaturbo.evaluation.metrics.summarize`; gives
            ``windows``, ``tokens_scored`` and every quality field.
        bytes_compressed: everything the cache holds for the evaluated sequences (> 0).
        bytes_bf16: the same cache stored as bf16 (> 0).
        bytes_model: per-model bytes the recipe needs (calibration, tables), not in ``ratio``.
        seconds: wall times with keys ``prefill``, ``encode``, ``decode`` (finite, >= 0).
        extra: further JSON-compatible fields (e.g. per-layer stats); may not shadow a
            contract field.

    Returns:
        A plain dict holding every field of :data:`CONTRACT_FIELDS` (plus the extra ones).

    Raises:
        ConfigError: a bad argument, named in the message.
    """
    for name, value in (("model", model), ("text", text), ("recipe", recipe)):
        _check_str(name, value)
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    for name, value, lo in (("ctx", ctx, 1), ("n_eval", n_eval, 1), ("bytes_compressed", bytes_compressed, 1),
                            ("bytes_bf16", bytes_bf16, 1), ("bytes_model", bytes_model, 0)):
        _check_int(name, value, lo)
    if not isinstance(summary, Summary):
        raise ConfigError(f"summary must be a Summary, got {type(summary).__name__}")
    if not isinstance(seconds, Mapping) or set(seconds) != set(SECONDS_KEYS):
        got = sorted(seconds) if isinstance(seconds, Mapping) else type(seconds).__name__
        raise ConfigError(f"seconds must have exactly the keys {list(SECONDS_KEYS)}, got {got}")
    for k in SECONDS_KEYS:
        v = seconds[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"seconds.{k} must be a finite number >= 0, got {v!r}")
    ratio = bytes_bf16 / bytes_compressed
    record: dict[str, Any] = {
        "model": model,
        "text": text,
        "recipe": recipe,
        "mode": mode,
        "ctx": ctx,
        "n_eval": n_eval,
        "windows": summary.windows,
        "tokens_scored": summary.tokens_scored,
        "bytes_compressed": bytes_compressed,
        "bytes_bf16": bytes_bf16,
        "ratio": ratio,
        "bits_per_element": 16.0 / ratio,
        "bytes_model": bytes_model,
        "ppl_ref": summary.ppl_ref,
        "ppl_ref_ci95": list(summary.ppl_ref_ci95),
        "ppl": summary.ppl,
        "ppl_ci95": list(summary.ppl_ci95),
        "delta_ppl_pct": summary.delta_ppl_pct,
        "delta_ppl_ci95": list(summary.delta_ppl_ci95),
        "per_window_delta_ppl_pct": list(summary.per_window_delta_ppl_pct),
        "kl": summary.kl,
        "kl_ci95": list(summary.kl_ci95),
        "top1_pct": summary.top1_pct,
        "top1_ci95": list(summary.top1_ci95),
        "verdict": verdict(summary.delta_ppl_pct, summary.top1_pct),
        "thresholds": copy.deepcopy(THRESHOLDS),
        "bootstrap": {"n_boot": summary.n_boot, "seed": summary.seed, "unit": "window"},
        "seconds": {k: float(seconds[k]) for k in SECONDS_KEYS},
    }
    clash = sorted(set(extra or {}) & set(record))
    if clash:
        raise ConfigError(f"extra may not override record fields {clash}")
    record.update(extra or {})
    return record


def check_record(record: Mapping[str, Any], where: str = "record") -> None:
    """Raise :class:`ConfigError` naming the first contract field ``record`` lacks."""
    if not isinstance(record, Mapping):
        raise ConfigError(f"{where} must be a dict, got {type(record).__name__}")
    missing = [k for k in CONTRACT_FIELDS if k not in record]
    if missing:
        raise ConfigError(f"{where} lacks field(s) {missing}")


def _ci(value: float, ci: list[float], fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _rows(records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows = []
    for i, r in enumerate(records):
        check_record(r, f"records[{i}]")
        rows.append((
            str(r["recipe"]), str(r["mode"]), str(r["ctx"]),
            f"{r['ratio']:.2f}x", f"{r['bits_per_element']:.2f}", f"{r['bytes_model'] / 1e6:.2f}",
            _ci(r["delta_ppl_pct"], r["delta_ppl_ci95"], "+.2f"), _ci(r["kl"], r["kl_ci95"], ".4f"),
            f"{r['top1_pct']:.1f}", str(r["verdict"]),
        ))
    return rows


def thresholds_note() -> str:
    """One line stating the verdict rule, from :data:`THRESHOLDS`."""
    a, m = THRESHOLDS["ACCEPT"], THRESHOLDS["MARGINAL"]
    return (
        f"Verdicts: ACCEPT if |Δppl| ≤ {a['abs_delta_ppl_pct']:g} % and top-1 ≥ {a['top1_pct']:g} %; "
        f"MARGINAL if |Δppl| ≤ {m['abs_delta_ppl_pct']:g} % and top-1 ≥ {m['top1_pct']:g} %; "
        "REJECT otherwise. "
        "Δppl = exp(mean NLL_alt − mean NLL_ref) − 1 pooled over all scored tokens; "
        "95 % intervals: percentile bootstrap over windows."
    )


def summary_table(records: list[dict[str, Any]]) -> str:
    """A fixed-width plain-text table (one row per record) for the terminal, thresholds below it."""
    rows = [HEADERS, *_rows(records)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(HEADERS))]
    lines = [
        "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, _RIGHT)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n" + thresholds_note() + "\n"


def markdown_grid(headers: tuple[str, ...], right: tuple[bool, ...], rows: list[tuple[str, ...]]) -> str:
    """Markdown table lines (no trailing newline): a header row, an alignment row (``right[c]``:
    column ``c`` right-aligned) and one line per row of cell strings; ``|`` in a cell is escaped."""
    if len(right) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ConfigError(f"markdown_grid: every row needs {len(headers)} cells, as the headers")
    align = "|" + "|".join("---:" if r else "---" for r in right) + "|"
    lines = ["| " + " | ".join(headers) + " |", align]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table (one row per record) with the verdict thresholds stated under it. Ratio and
    bits/elem count the bytes held per sequence; "model MB" is the per-model data the recipe needs
    (whitening, calibrated transforms), paid once per model and not in the ratio."""
    return markdown_grid(HEADERS, _RIGHT, _rows(records)) + "\n\n" + thresholds_note() + "\n"
