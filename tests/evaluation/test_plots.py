from __future__ import annotations

import math

import pytest

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.plots import is_kakeya, layer_bits_plot, pareto_front, pareto_plot
from kakeyaturbo.evaluation.report import result_record
from tests.evaluation.conftest import fake_summary


def test_pareto_front_by_hand():
    pts = [(1.0, 0.0), (2.0, 0.5), (2.0, 0.7), (3.0, 0.4), (4.0, 1.0), (3.5, 2.0), (4.0, 1.0)]
    # (2,0.5) is dominated by (3,0.4); (2,0.7) too; (3.5,2) by (4,1); equal points both stay
    assert pareto_front(pts) == [0, 3, 4, 6]


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(2.0, 1.0)]) == [0]
    assert pareto_front([(1.0, math.nan), (2.0, 1.0), (math.nan, 0.1)]) == [1]
    assert pareto_front([(3.0, 1.0), (1.0, 2.0), (2.0, 1.5)]) == [0]


def test_is_kakeya():
    assert is_kakeya("kakeya-max") and is_kakeya("v1.3-ppl")
    assert not is_kakeya("turboquant-3") and not is_kakeya("exact")


def _rec(recipe: str, compressed: int, d: float, kl: float, mode: str = "snapshot"):
    return result_record(model="m", text="t", recipe=recipe, mode=mode, ctx=1024, n_eval=128,
                         summary=fake_summary(delta_ppl_pct=d, kl=kl), bytes_compressed=compressed,
                         bytes_bf16=16000, bytes_model=0, seconds={"prefill": 0, "encode": 0, "decode": 0})


def test_pareto_plot_writes_a_png(tmp_path):
    records = [
        _rec("exact", 16000, 0.0, 0.0), _rec("turboquant-3", 3000, 2.5, 0.05),
        _rec("kivi-2", 2500, -8.0, 0.3, mode="streaming"), _rec("kakeya-balanced", 3500, 0.4, 0.01),
        _rec("v1.3-ppl", 6000, 1.2, 0.02),
    ]
    out = pareto_plot(records, tmp_path / "sub" / "pareto.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_pareto_plot_needs_records(tmp_path):
    with pytest.raises(ConfigError, match="at least one record"):
        pareto_plot([], tmp_path / "p.png")


def test_layer_bits_plot(tmp_path):
    out = layer_bits_plot([[1.0, 2.5], [3.0, None], [2.0, 1.5]], "r", tmp_path / "bits.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="per layer"):
        layer_bits_plot([], "r", tmp_path / "none.png")
