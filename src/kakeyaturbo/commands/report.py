"""``kakeya report``: rebuild benchmarks/RESULTS.md from the committed records (evaluates nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya report``."""
    p.add_argument("--benchmarks", type=Path, default=Path("benchmarks"), metavar="DIR",
                   help="folder holding results/*/results.jsonl, results/layer-bits/*.json and the codec bench "
                   "tables *.md (default: benchmarks)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="Markdown file to write (default: DIR/RESULTS.md)")


def run(args: argparse.Namespace) -> int:
    """Write the page."""
    from kakeyaturbo.evaluation.results_page import write_results_page

    out = write_results_page(args.benchmarks, args.out or args.benchmarks / "RESULTS.md")
    print(f"results page in {out}")
    return 0
