"""The ablation report: every row against the reference recipe, table and plot."""

from __future__ import annotations

import pytest

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.ablation import ablation_plot, ablation_table
from kakeyaturbo.recipes import load
from tests.evaluation.conftest import fake_record

CELL = {"model": "smollm2-135m", "text": "austen", "ctx": 256, "n_eval": 16, "windows": 2, "mode": "snapshot"}
REF = "benchmarks/recipes/kakeya-v2-k3-v3.json"


def _records(*recipes: str, **cell: object) -> list[dict]:
    out = []
    for recipe in recipes:
        rec = fake_record({**CELL, **cell, "recipe": recipe})
        out.append({**rec, "recipe": recipe.rsplit("/", 1)[-1].removesuffix(".json"),
                    "cell": {**CELL, **cell, "recipe": recipe}})
    return out


def test_table_puts_the_reference_first_and_compares_with_it():
    recs = _records("turboquant-3", REF, "exact")
    table = ablation_table(recs, "kakeya-v2-k3-v3")
    lines = table.splitlines()
    assert lines[2].startswith("| kakeya-v2-k3-v3 | reference") and "| 1.00x |" in lines[2]
    ref, row = recs[1], recs[0]
    # a row outside the kakeya configs shows its recipe's description
    assert lines[3].startswith(f"| turboquant-3 | {load('turboquant-3').description.replace('|', '/')} |")
    assert f"| {row['kl'] / ref['kl']:.2f}x |" in lines[3]
    assert f"| {row['top1_pct'] - ref['top1_pct']:+.1f} |" in lines[3]
    assert "| exact |" not in table and "same windows for every row" in table


def test_reference_must_be_there_once_and_settings_must_match():
    with pytest.raises(ConfigError, match="exactly one record of the reference"):
        ablation_table(_records("benchmarks/recipes/ablation/ablation-no-gain.json"), "kakeya-v2-k3-v3")
    mixed = _records(REF) + _records("benchmarks/recipes/ablation/ablation-no-gain.json", ctx=512)
    with pytest.raises(ConfigError, match="same ctx"):
        ablation_table(mixed, "kakeya-v2-k3-v3")


def test_plot_is_a_png(tmp_path):
    recs = _records(REF, "benchmarks/recipes/ablation/ablation-no-sink.json",
                    "benchmarks/recipes/ablation/ablation-no-gain.json")
    out = ablation_plot(recs, "kakeya-v2-k3-v3", tmp_path / "a.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_kakeya_rows_name_the_fields_that_differ_from_the_reference():
    ref = "kakeya-3b-head-gain0-refl0-fixed-uniform-sink1"
    recs = _records(ref, f"{ref}-sigma-q", "kakeya-3b-head-gain0-refl0-fixed-sink1-probe-head-sink2")
    lines = ablation_table(recs, ref).splitlines()
    assert lines[3].startswith(f"| {ref}-sigma-q | key_space: 'pre_rope' -> 'sigma_q' |")
    assert lines[4].startswith("| kakeya-3b-head-gain0-refl0-fixed-sink1-probe-head-sink2 | layer_bits: 'uniform' -> "
                               "'sensitivity'; probe.config: None -> {}; probe.layout: None -> 'head'; "
                               "probe.sink_tokens: None -> 2 |")
