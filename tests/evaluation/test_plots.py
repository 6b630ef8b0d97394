from __future__ import annotations

import math

import pytest
from matplotlib.text import Annotation

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.plots import (
    family,
    is_kakeya,
    layer_bits_plot,
    pareto_figure,
    pareto_front,
    pareto_plot,
    pyplot,
)
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


@pytest.mark.parametrize(("recipe", "expected"), [
    ("turboquant-3", "turboquant"), ("turboquant-prod-4", "turboquant-prod"), ("rotated-int8", "rotated-int"),
    ("kivi-2", "kivi"), ("fp8", "fp8"), ("kakeya-1.5b", "kakeya-*b"),
    ("kakeya-2.875b-head-refl0", "kakeya-*b-head-refl0"), ("kakeya-k3-v2.5b-uniform", "kakeya-kv*b-uniform"),
    ("rotated-int8-k-turboquant-3-v", "rotated-int8-k-turboquant-v"),
    ("v1.3-l5-outliers2.0", "seed v1.x"), ("kakeya-max", "kakeya-max"), ("ablation-no-gain", "ablation-no-gain"),
])
def test_family_strips_the_budget_suffix(recipe, expected):
    assert family(recipe) == expected


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


def _sweep_like() -> list[dict]:
    """Two families of four budgets, a baseline family of three, the shipped recipes, the exact
    reference, in both modes: many points close together, as in a real sweep."""
    out = []
    for mode in ("snapshot", "streaming"):
        out.append(_rec("exact", 16000, 0.0, 0.0, mode))
        for b in (2, 3, 4):
            out.append(_rec(f"turboquant-{b}", int(1000 * (b + 0.25)), 6.0 / b, 0.1 / b ** 2, mode))
        for suffix, scale in (("-head", 1.0), ("", 0.8)):
            for s in (1.5, 1.75, 2.5, 2.625):
                out.append(_rec(f"kakeya-{s:g}b{suffix}", int(1000 * s), 2.0 / s * scale, 0.02 / s ** 2 * scale, mode))
        for name, s in (("kakeya-quality", 2.625), ("kakeya-balanced", 2.5), ("kakeya-max", 1.5)):
            out.append(_rec(name, int(1000 * s), 2.0 / s * 0.8, 0.02 / s ** 2 * 0.8, mode))
    return out


def _annotations(ax) -> list[Annotation]:
    return [c for c in ax.get_children() if isinstance(c, Annotation)]


def test_pareto_figure_draws_one_line_per_family_and_labels_only_front_and_shipped():
    records = _sweep_like()
    fig = pareto_figure(records)
    try:
        axes = [ax for ax in fig.axes if ax.get_ylabel()]
        assert len(axes) == 4  # (snapshot, streaming) x (KL, |dppl|); secondary axes have no y label
        renderer = fig.canvas.get_renderer()
        for ax in axes:
            lines = [ln.get_label() for ln in ax.get_lines()]
            fams = [t for t in lines if t in ("turboquant", "kakeya-*b-head", "kakeya-*b")]
            assert sorted(fams) == ["kakeya-*b", "kakeya-*b-head", "turboquant"]  # one line each
            assert "exact" not in lines and lines.count("shipped recipe") == 1
            for ln in ax.get_lines():
                if ln.get_label() in fams:
                    x = list(ln.get_xdata())
                    assert x == sorted(x) and len(x) in (3, 4)
            mode = ax.get_title().split(",")[0]
            recs = [r for r in records if r["mode"] == mode and r["recipe"] != "exact"]
            key = "kl" if ax.get_ylabel().startswith("KL") else "delta_ppl_pct"
            front = {recs[i]["recipe"] for i in pareto_front([(r["ratio"], abs(r[key])) for r in recs])}
            texts = {a.get_text() for a in _annotations(ax)}
            assert {"kakeya-quality", "kakeya-balanced", "kakeya-max"} <= texts
            assert texts <= front | {"kakeya-quality", "kakeya-balanced", "kakeya-max"}
            assert "turboquant-2" not in texts  # dominated: never labelled
            boxes = [a.get_window_extent(renderer) for a in _annotations(ax)]
            for i, b in enumerate(boxes):
                assert not any(b.overlaps(o) for o in boxes[i + 1:])
    finally:
        pyplot().close(fig)


def test_pareto_front_line_spans_every_measured_bit_width():
    records = [r for r in _sweep_like() if r["mode"] == "snapshot"]
    fig = pareto_figure(records)
    try:
        bits = [r["bits_per_element"] for r in records if r["recipe"] != "exact"]
        for ax in (a for a in fig.axes if a.get_ylabel()):
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
            x = line.get_xdata()
            assert min(x) == pytest.approx(min(bits)) and max(x) >= max(bits)
    finally:
        pyplot().close(fig)


def test_pareto_plot_needs_records(tmp_path):
    with pytest.raises(ConfigError, match="at least one record"):
        pareto_plot([], tmp_path / "p.png")


def test_layer_bits_plot(tmp_path):
    out = layer_bits_plot([[1.0, 2.5], [3.0, None], [2.0, 1.5]], "r", tmp_path / "bits.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="per layer"):
        layer_bits_plot([], "r", tmp_path / "none.png")
