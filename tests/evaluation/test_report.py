from __future__ import annotations

import json

import pytest

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.metrics import THRESHOLDS
from kakeyaturbo.evaluation.report import CONTRACT_FIELDS, markdown_table, result_record, summary_table
from tests.evaluation.conftest import fake_summary

SECONDS = {"prefill": 1.5, "encode": 0.25, "decode": 0.125}


def _record(**over):
    kw = dict(model="smollm2-135m", text="austen", recipe="kakeya-balanced", mode="snapshot", ctx=1024,
              n_eval=128, summary=fake_summary(), bytes_compressed=1000, bytes_bf16=4000, bytes_model=77,
              seconds=SECONDS)
    kw.update(over)
    return result_record(**kw)


def test_record_has_every_contract_field_and_is_json():
    r = _record(extra={"per_layer": [{"layer": 0}]})
    assert set(CONTRACT_FIELDS) <= set(r)
    assert r["ratio"] == 4.0 and r["bits_per_element"] == 4.0
    assert r["windows"] == 8 and r["tokens_scored"] == 1016
    assert r["delta_ppl_ci95"] == [0.0, 1.0] and len(r["kl_ci95"]) == 2
    assert r["verdict"] == "ACCEPT" and r["thresholds"] == THRESHOLDS
    assert r["thresholds"] is not THRESHOLDS
    assert r["seconds"] == SECONDS and r["per_layer"] == [{"layer": 0}]
    assert json.loads(json.dumps(r)) == r


def test_verdict_follows_the_summary():
    assert _record(summary=fake_summary(delta_ppl_pct=2.0))["verdict"] == "MARGINAL"
    assert _record(summary=fake_summary(top1_pct=80.0))["verdict"] == "REJECT"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"mode": "online"}, "mode must be one of"),
        ({"recipe": ""}, "recipe must be a non-empty string"),
        ({"ctx": 0}, "ctx must be an integer >= 1"),
        ({"bytes_compressed": 0}, "bytes_compressed must be"),
        ({"bytes_bf16": 2.5}, "bytes_bf16 must be"),
        ({"bytes_model": -1}, "bytes_model must be"),
        ({"seconds": {"prefill": 1.0}}, "seconds must have exactly the keys"),
        ({"seconds": {**SECONDS, "decode": float("nan")}}, "seconds.decode"),
        ({"summary": {"ppl": 1.0}}, "summary must be a Summary"),
        ({"extra": {"ratio": 9.0}}, r"extra may not override record fields \['ratio'\]"),
    ],
)
def test_bad_arguments_raise_config_error(over, match):
    with pytest.raises(ConfigError, match=match):
        _record(**over)


def test_tables_have_one_row_per_record_and_state_thresholds():
    records = [_record(), _record(recipe="turboquant-3", mode="streaming",
                                  summary=fake_summary(delta_ppl_pct=-12.345, kl=0.5, top1_pct=70.0))]
    text = summary_table(records)
    lines = text.splitlines()
    assert lines[0].split()[0] == "recipe" and set(lines[1]) <= {"-", " "}
    assert "turboquant-3" in lines[3] and "-12.35 [-12.85, -11.85]" in lines[3] and "REJECT" in lines[3]
    assert len({len(line) for line in lines[:2]}) == 1  # fixed width
    assert "ACCEPT if |Δppl| ≤ 1 % and top-1 ≥ 95 %" in text and "MARGINAL if |Δppl| ≤ 3 %" in text
    md = markdown_table(records)
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and rows[1].startswith("|---|")
    assert "| kakeya-balanced | snapshot | 1024 | 4.00x | 4.00 | 0.00 | +0.50 [+0.00, +1.00] |" in rows[2]
    assert "bootstrap over windows" in md.splitlines()[-1]


def test_tables_reject_incomplete_records():
    with pytest.raises(ConfigError, match=r"records\[0\] lacks field\(s\) \['kl'"):
        markdown_table([{k: v for k, v in _record().items() if k != "kl"}])
