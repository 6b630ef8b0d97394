"""Model-independent evaluation: metrics and verdicts, ``kakeya eval`` records and tables, resumable
sweeps and Pareto plots. The model-running harness (``evaluation.harness``) builds on these."""

from __future__ import annotations

from kakeyaturbo.evaluation.metrics import (
    THRESHOLDS,
    Summary,
    TokenMetrics,
    summarize,
    token_metrics,
    verdict,
)
from kakeyaturbo.evaluation.plots import pareto_front, pareto_plot
from kakeyaturbo.evaluation.report import markdown_table, result_record, summary_table
from kakeyaturbo.evaluation.sweep import load_grid, run_sweep

__all__ = [
    "THRESHOLDS",
    "Summary",
    "TokenMetrics",
    "load_grid",
    "markdown_table",
    "pareto_front",
    "pareto_plot",
    "result_record",
    "run_sweep",
    "summarize",
    "summary_table",
    "token_metrics",
    "verdict",
]
