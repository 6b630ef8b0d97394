from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kakeyaturbo.errors import ConfigError, CorruptDataError, KakeyaError
from kakeyaturbo.evaluation import sweep
from kakeyaturbo.evaluation.sweep import (
    CELL_DEFAULTS,
    cell_key,
    expand_grid,
    group_cells,
    load_grid,
    read_results,
    run_sweep,
)
from tests.evaluation.conftest import fake_record

GRID = {
    "defaults": {"ctx": 256, "n_eval": 16, "windows": 2, "mode": "snapshot"},
    "cells": [{"recipe": "turboquant-3"}, {"recipe": "kakeya-balanced", "ctx": 512}],
    "grid": {"recipe": ["kivi-2", "kakeya-max"], "mode": ["snapshot", "streaming"]},
}


def _write(tmp_path: Path, spec: Any, name: str = "grid.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(spec))
    return p


class FakeEvaluate:
    """Records each call; raises on call number ``fail_on`` (1-based) to simulate a killed sweep."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.fail_on = fail_on

    def __call__(self, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.calls.append(cells)
        if len(self.calls) == self.fail_on:
            raise RuntimeError("killed")
        return [fake_record(c) for c in cells]


def test_expand_grid_merges_defaults_cells_and_cartesian_grid():
    cells = expand_grid(GRID)
    assert len(cells) == 2 + 4
    assert cells[0] == {
        "model": "smollm2-135m",
        "text": "austen",
        "ctx": 256,
        "n_eval": 16,
        "windows": 2,
        "mode": "snapshot",
        "recipe": "turboquant-3",
    }
    assert cells[1]["ctx"] == 512
    assert [(c["recipe"], c["mode"]) for c in cells[2:]] == [
        ("kivi-2", "snapshot"),
        ("kivi-2", "streaming"),
        ("kakeya-max", "snapshot"),
        ("kakeya-max", "streaming"),
    ]


def test_duplicates_are_removed():
    cells = expand_grid(
        {"cells": [{"recipe": "fp8"}, {"recipe": "fp8", "ctx": 1024}], "grid": {"recipe": ["fp8"]}}
    )
    assert len(cells) == 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"cells": [{"recipe": "fp8"}], "extra": 1}, r"unknown top-level key\(s\) \['extra'\]"),
        ({"cells": [{"recipe": "fp8", "ctxx": 5}]}, "unknown key 'ctxx'"),
        (
            {"defaults": {"mode": "online"}, "cells": [{"recipe": "fp8"}]},
            "defaults: key 'mode' must be one of",
        ),
        ({"cells": [{"recipe": "fp8", "ctx": "1k"}]}, "cell 0: key 'ctx' must be an integer >= 1"),
        ({"cells": [{"recipe": "fp8", "windows": True}]}, "key 'windows' must be an integer"),
        ({"grid": {"recipe": []}}, "grid: key 'recipe' must be a non-empty list"),
        ({"grid": {"n_eval": [0]}}, "grid: key 'n_eval' must be an integer >= 1"),
        ({"cells": [{"ctx": 128}]}, "cell 0: key 'recipe' is required"),
        ({}, "at least one entry"),
        ({"cells": {"recipe": "fp8"}}, "'cells' must be a list of objects"),
        ([1, 2], "grid must be an object"),
    ],
)
def test_bad_grids_name_the_bad_key(spec, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid(spec)


def test_grid_file_formats(tmp_path):
    toml = tmp_path / "g.toml"
    toml.write_text(
        '[defaults]\nctx = 128\n\n[grid]\nrecipe = ["fp8", "kivi-2"]\n\n[[cells]]\nrecipe = "exact"\n'
    )
    cells = load_grid(toml)
    assert [c["recipe"] for c in cells] == ["exact", "fp8", "kivi-2"] and cells[0]["ctx"] == 128
    assert load_grid(_write(tmp_path, GRID)) == expand_grid(GRID)
    with pytest.raises(ConfigError, match="must end in .json or .toml"):
        load_grid(_write(tmp_path, GRID, "grid.yaml"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_grid(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_grid(tmp_path / "missing.json")


def test_toml_without_tomllib_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "tomllib", None)
    (tmp_path / "g.toml").write_text("")
    with pytest.raises(ConfigError, match="TOML needs Python >= 3.11"):
        load_grid(tmp_path / "g.toml")


@given(st.dictionaries(st.sampled_from(["recipe", "model", "text", "mode"]), st.text(max_size=5), min_size=1))
def test_cell_key_is_stable_and_order_free(cell):
    reordered = dict(reversed(list(cell.items())))
    assert cell_key(cell) == cell_key(reordered) and len(cell_key(cell)) == 16


def test_cells_that_differ_only_in_recipe_share_a_group():
    groups = group_cells(expand_grid(GRID))
    assert [[c["recipe"] for c in g] for g in groups] == [
        ["turboquant-3", "kivi-2", "kakeya-max"],
        ["kakeya-balanced"],
        ["kivi-2", "kakeya-max"],
    ]


def test_sweep_writes_results_table_and_plot(tmp_path):
    ev = FakeEvaluate()
    records = run_sweep(_write(tmp_path, GRID), tmp_path / "out", ev, progress=False)
    assert len(ev.calls) == 3 and len(records) == 6
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    # the file is in evaluation (group) order, the returned records in grid order
    assert sorted(json.loads(line)["cell_key"] for line in lines) == sorted(r["cell_key"] for r in records)
    assert records[0]["cell"]["recipe"] == "turboquant-3"
    assert "| turboquant-3 |" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    again = FakeEvaluate()
    assert run_sweep(_write(tmp_path, GRID), tmp_path / "out", again, progress=False) == records
    assert again.calls == []


def test_killed_sweep_resumes_to_the_same_files(tmp_path):
    grid = _write(tmp_path, GRID)
    run_sweep(grid, tmp_path / "clean", FakeEvaluate(), progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(grid, tmp_path / "resumed", FakeEvaluate(fail_on=3), progress=False)
    assert len((tmp_path / "resumed" / "results.jsonl").read_text().splitlines()) == 4
    # a write cut short by the kill leaves a partial line: it must be dropped and redone
    with (tmp_path / "resumed" / "results.jsonl").open("a") as f:
        f.write('{"cell_key": "abc", "rec')
    ev = FakeEvaluate()
    run_sweep(grid, tmp_path / "resumed", ev, progress=False)
    assert [[c["recipe"] for c in call] for call in ev.calls] == [["kivi-2", "kakeya-max"]]
    for name in ("results.jsonl", "table.md"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_partially_done_group_passes_only_pending_cells(tmp_path):
    grid = _write(tmp_path, {"cells": [{"recipe": "a"}, {"recipe": "b"}, {"recipe": "c"}]})
    out = tmp_path / "out"
    run_sweep(_write(tmp_path, {"cells": [{"recipe": "b"}]}, "one.json"), out, FakeEvaluate(), progress=False)
    ev = FakeEvaluate()
    records = run_sweep(grid, out, ev, progress=False)
    assert [[c["recipe"] for c in call] for call in ev.calls] == [["a", "c"]]
    assert [r["recipe"] for r in records] == ["a", "b", "c"]
    assert "| b |" in (out / "table.md").read_text()


def test_evaluate_contract_is_checked(tmp_path):
    grid = _write(tmp_path, {"cells": [{"recipe": "a"}, {"recipe": "b"}]})
    with pytest.raises(KakeyaError, match=r"one record per cell of its group \(2\), got 1"):
        run_sweep(grid, tmp_path / "o1", lambda cells: [fake_record(cells[0])], progress=False)
    with pytest.raises(ConfigError, match=r"lacks field\(s\)"):
        run_sweep(
            grid, tmp_path / "o2", lambda cells: [{"recipe": c["recipe"]} for c in cells], progress=False
        )
    with pytest.raises(KakeyaError, match="must follow the cells' order"):
        run_sweep(
            grid, tmp_path / "o4", lambda cells: [fake_record(c) for c in reversed(cells)], progress=False
        )
    one = _write(tmp_path, {"cells": [{"recipe": "a"}]}, "one.json")
    assert (
        run_sweep(one, tmp_path / "o3", lambda cells: fake_record(cells[0]), progress=False)[0]["recipe"]
        == "a"
    )


def test_corrupt_complete_line_is_an_error(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"cell_key": "x"}\nnot json\n')
    with pytest.raises(CorruptDataError, match="line 2 is not valid JSON"):
        read_results(p)
    p.write_text('{"no_key": 1}\n')
    with pytest.raises(CorruptDataError, match="line 1 is not a record"):
        read_results(p)


def test_kakeya_field_overrides_become_generated_recipe_names():
    cells = expand_grid({"grid": {"recipe": ["kakeya-balanced"], "bits": [1.5, 2, 2.5, 3],
                                  "layout": ["head", "joint"]}})
    assert [c["recipe"] for c in cells] == [
        "kakeya-1.5b-head-probe-head", "kakeya-1.5b-probe-head", "kakeya-2b-head-probe-head", "kakeya-2b-probe-head",
        "kakeya-2.5b-head-probe-head", "kakeya-2.5b-probe-head", "kakeya-3b-head-probe-head", "kakeya-3b-probe-head",
    ]
    assert all(set(c) == set(CELL_DEFAULTS) | {"recipe"} for c in cells)
    mixed = expand_grid({"defaults": {"sink_tokens": 1, "layer_bits": "uniform"},
                         "cells": [{"recipe": "kakeya-3b-head", "coding": "fixed", "v_bits": 2.5}]})
    assert [c["recipe"] for c in mixed] == ["kakeya-k3-v2.5b-head-fixed-uniform-sink1"]


def test_overrides_of_one_config_under_two_spellings_are_one_cell():
    cells = expand_grid({"cells": [{"recipe": "kakeya-balanced", "bits": 3}, {"recipe": "kakeya-3b-probe-head"},
                                   {"recipe": "kakeya-max", "bits": 2.5}, {"recipe": "kakeya-balanced"}]})
    assert [c["recipe"] for c in cells] == ["kakeya-3b-probe-head", "kakeya-2.5b-probe-head", "kakeya-balanced"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"cells": [{"recipe": "kakeya-max"}, {"recipe": "turboquant-3", "bits": 2}]},
         r"cell 1: recipe 'turboquant-3' is not of the kakeya family.*\['bits'\]"),
        ({"grid": {"recipe": ["kakeya-max"], "layout": ["rows"]}}, "cell 0: overriding.*layout must be one of"),
        ({"cells": [{"recipe": "kakeya-max", "reflector_bits": 1}]}, "cell 0: overriding.*reflector_bits must be 0"),
        ({"cells": [{"recipe": "kakeya-max", "probe": {}}]}, "unknown key 'probe'"),
    ],
)
def test_bad_overrides_name_the_cell(spec, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid(spec)


def test_records_of_overridden_cells_keep_the_recipe_they_ran(tmp_path):
    from kakeyaturbo import recipes

    def evaluate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # as the harness does: the record names the recipe and carries its full dict
        return [{**fake_record(c), "recipe_config": recipes.load(c["recipe"]).to_dict()} for c in cells]

    grid = _write(tmp_path, {"defaults": {"ctx": 256, "n_eval": 16, "windows": 2},
                             "grid": {"recipe": ["kakeya-quality"], "bits": [2, 3]}})
    records = run_sweep(grid, tmp_path / "out", evaluate, progress=False)
    assert [r["recipe"] for r in records] == ["kakeya-2b-probe-head", "kakeya-3b-probe-head"]
    assert records[1]["recipe_config"]["k"]["config"]["bits"] == 3.0
    assert recipes.Recipe.from_dict(records[0]["recipe_config"]) == recipes.load("kakeya-2b-probe-head")
    assert "| kakeya-3b-probe-head | snapshot | 256 |" in (tmp_path / "out" / "table.md").read_text()
