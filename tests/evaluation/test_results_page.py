from __future__ import annotations

import re
from pathlib import Path

import pytest

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.results_page import SECTIONS, best_ratio_table, results_page
from kakeyaturbo.evaluation.sweep import read_results
from tests.evaluation.test_plots import _rec

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def test_best_ratio_picks_the_highest_ratio_meeting_each_target():
    records = [_rec("exact", 16000, 0.0, 0.0), _rec("kivi-4", 5000, 0.4, 0.004), _rec("turboquant-3", 3200, 2.0, 0.02),
               _rec("kakeya-v2a-s2.5", 2500, 0.5, 0.005), _rec("kakeya-v2j-s1.5", 1500, 2.5, 0.03)]
    table = best_ratio_table(records)
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert "6.40x (kakeya-v2a-s2.5)" in rows["abs Δppl ≤ 1 %"] and "3.20x (kivi-4)" in rows["abs Δppl ≤ 1 %"]
    assert "10.67x (kakeya-v2j-s1.5)" in rows["abs Δppl ≤ 3 %"] and "5.00x (turboquant-3)" in rows["abs Δppl ≤ 3 %"]
    assert "exact" not in table


def test_page_has_every_committed_record_and_the_readme_headline():
    page = results_page(BENCH)
    for section in SECTIONS:
        records = read_results(BENCH / "results" / section.folder / "results.jsonl")
        skipped = sum(r["recipe"] == "exact" for r in records) if section.ablation_reference else 0
        body = page.split(f"## {section.title}\n", 1)[1].split("\n## ", 1)[0]
        rows = [ln for ln in body.splitlines() if ln.startswith("| ") and not ln.startswith("| recipe")]
        assert len(rows) == len(records) - skipped  # the ablation table leaves `exact` out
    headline = page.split("## Headline", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(ln for ln in headline.splitlines() if ln.startswith("|"))
    assert table in (ROOT / "README.md").read_text(encoding="utf-8")  # the README copies these rows
    assert not re.search(r"\n\n\n", page)


def test_page_needs_the_records(tmp_path):
    with pytest.raises(ConfigError, match="no records"):
        results_page(tmp_path)
