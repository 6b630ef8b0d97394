"""The model-running harness: chunk-grid groups, and a small end-to-end `kakeya eval` on the default
model (2 windows of 256 tokens) in both modes."""

from __future__ import annotations

import json

import pytest

from kakeyaturbo.cli import main
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.harness import EvalSettings, _groups


def test_groups_follow_the_chunk_grid():
    assert _groups(128, 64) == [(0, 64), (64, 128)]
    assert _groups(100, 64) == [(0, 64), (64, 100)]
    assert _groups(5, 64) == [(0, 5)]


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="mode"):
        EvalSettings(mode="live")
    with pytest.raises(ConfigError, match="n_eval"):
        EvalSettings(n_eval=1)


@pytest.mark.model
@pytest.mark.parametrize("mode", ["snapshot", "streaming"])
def test_eval_end_to_end(tmp_path, mode, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--recipe", "exact", "--recipe", "fp8", "--recipe", "turboquant-2", "--ctx", "224",
               "--n-eval", "32", "--windows", "2", "--mode", mode, "--json", str(out)])
    assert rc == 0
    records = {r["recipe"]: r for r in json.loads(out.read_text())}
    exact, fp8, tq2 = records["exact"], records["fp8"], records["turboquant-2"]
    assert exact["kl"] < 1e-6 and abs(exact["delta_ppl_pct"]) <= 0.05 and exact["top1_pct"] == 100.0
    assert exact["ratio"] == pytest.approx(1.0) and exact["verdict"] == "ACCEPT"
    # streaming: the 32 continuation tokens wait in fp8's 64-token hot window, exact (and counted)
    assert (1.8 if mode == "snapshot" else 1.6) < fp8["ratio"] < 2.0 and fp8["kl"] < tq2["kl"]
    assert tq2["ratio"] > (5.0 if mode == "snapshot" else 3.5)
    for r in records.values():
        assert r["tokens_scored"] == 2 * 31 and r["windows"] == 2 and r["mode"] == mode
        assert r["bytes_bf16"] == 30 * 2 * 3 * 64 * 2 * 2 * (224 if mode == "snapshot" else 256)
        assert r["thresholds"]["ACCEPT"]["abs_delta_ppl_pct"] == 1.0
        assert r["recipe_config"]["name"] == r["recipe"] and "k" in r["recipe_config"]
    assert "Verdicts: ACCEPT" in capsys.readouterr().out
