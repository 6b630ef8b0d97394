"""Helpers for the evaluation tests: synthetic summaries and records without a model."""

from __future__ import annotations

import hashlib
from typing import Any

from kakeyaturbo.evaluation.metrics import Summary
from kakeyaturbo.evaluation.report import result_record


def fake_summary(delta_ppl_pct: float = 0.5, kl: float = 0.01, top1_pct: float = 97.0) -> Summary:
    """A Summary with the given point values and intervals around them."""
    return Summary(
        ppl_ref=20.0, ppl=20.0 * (1 + delta_ppl_pct / 100), delta_ppl_pct=delta_ppl_pct, kl=kl,
        top1_pct=top1_pct, ppl_ref_ci95=(18.0, 22.0), ppl_ci95=(18.5, 22.5),
        delta_ppl_ci95=(delta_ppl_pct - 0.5, delta_ppl_pct + 0.5),
        kl_ci95=(kl * 0.8, kl * 1.2), top1_ci95=(top1_pct - 1, min(top1_pct + 1, 100.0)),
        tokens_scored=1016, windows=8, per_window_delta_ppl_pct=(delta_ppl_pct,) * 8, n_boot=2000, seed=0,
    )


def fake_record(cell: dict[str, Any]) -> dict[str, Any]:
    """A deterministic record for a sweep cell: its numbers derive from a hash of the cell."""
    h = int(hashlib.sha256(repr(sorted(cell.items())).encode()).hexdigest()[:8], 16)
    return result_record(
        model=cell["model"], text=cell["text"], recipe=cell["recipe"], mode=cell["mode"], ctx=cell["ctx"],
        n_eval=cell["n_eval"],
        summary=fake_summary(delta_ppl_pct=(h % 700) / 100 - 1, kl=1e-3 * (1 + h % 97), top1_pct=80 + h % 20),
        bytes_compressed=1000 + h % 9000, bytes_bf16=40_000, bytes_model=0,
        seconds={"prefill": 0.1, "encode": 0.2, "decode": 0.3},
    )
