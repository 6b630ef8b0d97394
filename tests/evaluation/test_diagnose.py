"""The per-layer diagnostic on a tiny calibrated model: every compressed layer reported, errors sane."""

from __future__ import annotations

import pytest
import torch

from kakeyaturbo.evaluation.diagnose import layer_errors, markdown
from kakeyaturbo.recipes import Recipe


@pytest.mark.model
def test_layer_errors(tiny_bundle):
    model, cal = tiny_bundle
    recipe = Recipe.from_dict({"name": "probe", "boundary_layers": [0], "chunk_tokens": 16,
                               "k": {"codec": "turboquant", "config": {"bits": 2}, "whiten": "sigma_q"},
                               "v": {"codec": "turboquant", "config": {"bits": 2}}})
    rows = layer_errors(model, torch.randint(0, 1000, (1, 48)), recipe, cal)
    assert [r["layer"] for r in rows] == [1, 2]  # layer 0 is exact
    for r in rows:
        assert r["whitened"] and 0 < r["metric_sigma_q"] < 1 and 0 < r["logit"] < 1 and 0 < r["value"] < 1
    assert "| 1 | yes |" in markdown(rows, "probe")
