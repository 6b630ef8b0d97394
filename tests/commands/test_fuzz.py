"""``kakeya fuzz``: counts per codec and mutation, written as JSON."""

from __future__ import annotations

import json

from kakeyaturbo.cli import main
from kakeyaturbo.fuzzing import MUTATIONS, OUTCOMES


def test_fuzz_writes_its_counts(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    assert main(["fuzz", "--codec", "fp8", "--codec", "kivi", "--cases", "60", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cases"] == 60 and result["codecs"] == ["fp8", "kivi"]
    assert sum(result["totals"].values()) == 60 and set(result["totals"]) == set(OUTCOMES)
    assert sum(result["per_codec"]["fp8"].values()) == 30
    assert set(result["per_codec_mutation"]["kivi"]) <= set(MUTATIONS)
    assert result["totals"]["library_error"] > 0 and result["failures"] == {}
    assert "library_error=" in capsys.readouterr().out
