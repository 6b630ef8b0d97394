"""``benchmarks/RESULTS.md``: every committed result as tables generated from the records.

The page is rebuilt from what ``kakeya sweep``, ``kakeya recipes --layers --json`` and
``kakeya bench --markdown`` committed under a benchmarks folder: ``results/*/results.jsonl``
(record tables with :func:`~kakeyaturbo.evaluation.report.markdown_table`, ablations with
:func:`~kakeyaturbo.evaluation.ablation.ablation_table`), ``results/layer-bits/*.json`` and the
codec bench tables ``*.md``. Hand-written notes that interpret a folder's results live next to its
records in ``NOTE.md`` and are copied under its tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.ablation import ablation_table
from kakeyaturbo.evaluation.metrics import THRESHOLDS
from kakeyaturbo.evaluation.plots import SHIPPED, family, is_kakeya
from kakeyaturbo.evaluation.report import markdown_grid, markdown_table
from kakeyaturbo.evaluation.sweep import RESULTS, read_results

HEADLINE = ("fp8", "rotated-int4", "kivi-4", "turboquant-3", *SHIPPED)
MODEL_MB_BOUND = 1e6


@dataclass(frozen=True)
class Section:
    """One results folder on the page: its heading, what was measured, and the ablation reference
    (the recipe the ``ablation_table`` compares every row with), if it is an ablation."""

    folder: str
    title: str
    what: str
    ablation_reference: str | None = None


SECTIONS = (
    Section("ctx1024", "Every recipe, ctx 1024, 8 windows",
            "The sweeps of `benchmarks/sweeps/*-ctx1024.json` (8 windows × (1024 + 128) tokens, 1,016 scored "
            "predictions per row)."),
    Section("windows32", "32-window check, ctx 1024",
            "32 windows (4,064 scored predictions): the shipped recipes and the candidates next to them."),
    Section("ctx2048", "ctx 2048 check", "8 windows × (2048 + 128) tokens."),
    Section("ablation", "Ablation of the v2 design",
            "v2 at 3 bits per element for K and V in every layer, first token exact; each row switches one "
            "design element off (or a whitening on), on the same 8 windows, snapshot.",
            "kakeya-3b-head-gain0-refl0-fixed-uniform-sink1"),
    Section("ablation-layer-bits", "Ablation of the layer budgets and the second exact token",
            "Reference `kakeya-3b-head-gain0-refl0-fixed-probe-head`, 3 bits per element on average, same 8 windows, "
            "snapshot.", "kakeya-3b-head-gain0-refl0-fixed-probe-head"),
    Section("ablation-sigma-q", "Ablation around the earlier Σ_q-whitened design (kept as measured)",
            "Every row changed one element of the design of commit 805bd5c; the recipe files have changed "
            "since, so only the measured rows are shown."),
)
BENCHES = (
    ("codecs.md", "Codec micro-benchmark, synthetic KV",
     "`kakeya bench --codec all --streams 4 --tokens 2048 --repeats 3`: synthetic KV-like data, D = 64 and 128. "
     "IP err = mean |qᵀ(k − k̂)| / (‖q‖‖k‖) for Gaussian q; speeds in MB/s of bf16 input on the shared "
     "2-core CPU, indicative only. Synthetic data with a steep spectrum flatters the PCA codecs; the model "
     "rows above are what counts."),
    ("codecs-captured.md", "Codecs on SmolLM2's captured K/V",
     "`kakeya bench --data captured`: all 90 (layer, head) streams, 2,048 evaluation-text tokens each; v2 "
     "transforms fitted on calibration text at a uniform budget."),
    ("codecs-captured-joint.md", "kakeya-v2 joint-head transforms on captured K/V",
     "`kakeya bench --codec kakeya-v2 --data captured --layout joint`: one row per token holding the "
     "layer's three KV heads (192 features)."),
    ("codec-speed.md", "Codec speed at the engine's shapes",
     "`kakeya bench --recipe shipped --threads 2 --repeats 15`: each recipe's K and V codec on one engine call, 16 "
     "chunks of its chunk_tokens tokens of 3 synthetic KV heads of D = 64 in its layout (the kakeya recipes: joint "
     "rows of D = 192 at their average budget). MB/s of bf16 input on both cores of the shared 2-core CPU."),
    ("generate.md", "Generation speed against DynamicCache",
     "`kakeya bench --generate --ctx 1024 4096 --steps 16 --repeats 3`: SmolLM2 in bf16 prefills ctx tokens of "
     "the evaluation text and generates 16 greedily, once with DynamicCache and once per recipe, interleaved "
     "within each round; ratios are medians over rounds of runs made side by side on the 2-core CPU."),
    ("cross-layer/cross_layer.md", "Bases over several layers (idealised)",
     "`benchmarks/cross_layer.py`: eigenbases of groups of a token's features (one KV head, one layer, 2 / 4 / 10 "
     "adjacent layers) fitted on calibration text; the Gaussian rate-distortion error of each at equal bits on "
     "evaluation text, one water level over the model. Ranks transforms; not a codec's figure (see its NOTE.md)."),
    ("cross-layer/kl.md", "Bases over several layers: model quality",
     "`benchmarks/cross_layer.py --kl --windows 8 --bits 1.5 2 2.5`: the real kakeya-v2 codec of the shipped "
     "recipes fitted per block of one layer, two or four adjacent layers, every block at the same bits, coding the "
     "whole prefill cache; Δppl, KL and top-1 against the exact cache, snapshot mode, 8 windows of ctx 1,024."),
    ("cross-layer/kl-reflector3.md", "Bases over several layers: model quality with 3-bit reflectors",
     "`benchmarks/cross_layer.py --kl --windows 8 --groups pair quad --reflector-bits 3 --bits 1.5 2 2.5`: as "
     "above, the bases stored as 3-bit reflectors (quads within the 1 % bound up to 2.5 bits)."),
    ("allocation/allocation.md", "Which components to code: water-filling against a search",
     "`benchmarks/allocation.py`: per layer and stream, the components kakeya-v2's entropy-coded slots code, "
     "moved by a few from water-filling's choice (the slot unchanged); relative squared error on evaluation text."),
    ("entropy/kakeya-balanced.md", "Entropy coding against the fixed slots, kakeya-balanced",
     "`benchmarks/entropy_coding.py`: each stream's quantiser input coded with one step and calibrated "
     "per-component models (estimated and ANS-coded by constriction), at the slots' squared error; the "
     "empirical-entropy bound at that step, and coding from the previous token (closed loop, per chunk)."),
    ("entropy/kakeya-max.md", "Entropy coding against the fixed slots, kakeya-max",
     "As above, for kakeya-max."),
    ("kakeya_codec.md", "The seed's KakeyaTurbo block codec grid",
     "bits × PCA × block size on synthetic KV (single-threaded run)."),
)


def _verdict_at_least(level: str) -> Callable[[dict[str, Any]], bool]:
    ok = ("ACCEPT",) if level == "ACCEPT" else ("ACCEPT", "MARGINAL")
    return lambda r: r["verdict"] in ok


def _dppl_within(pct: float) -> Callable[[dict[str, Any]], bool]:
    return lambda r: abs(float(r["delta_ppl_pct"])) <= pct


TARGETS: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = tuple(
    [(f"abs Δppl ≤ {THRESHOLDS[v]['abs_delta_ppl_pct']:g} %", _dppl_within(THRESHOLDS[v]["abs_delta_ppl_pct"]))
     for v in ("ACCEPT", "MARGINAL")]
    + [(f"verdict ≥ {v}", _verdict_at_least(v)) for v in ("ACCEPT", "MARGINAL")]
)


def _records(bench_dir: Path, folder: str) -> list[dict[str, Any]]:
    path = bench_dir / "results" / folder / RESULTS
    if not path.exists():
        raise ConfigError(f"results page: no records at {path}")
    return read_results(path)


def _ordered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by mode, then ``exact``, baselines before KakeyaTurbo, then family, then bits (most first)."""
    return sorted(records, key=lambda r: (r["mode"], r["ctx"], r["windows"], r["recipe"] != "exact",
                                          is_kakeya(r["recipe"]),
                                          family(r["recipe"]), -float(r["bits_per_element"]), r["recipe"]))


def headline_table(records: list[dict[str, Any]]) -> str:
    """The rows of :data:`HEADLINE` (the shipped recipes and the best baselines) in both modes, as
    :func:`markdown_table` writes them; ``records`` are one folder's (one ctx and window count)."""
    rows = [r for r in records if r["recipe"] in HEADLINE]
    rows.sort(key=lambda r: (r["mode"], HEADLINE.index(r["recipe"])))
    return markdown_table(rows)


def _best(chosen: list[dict[str, Any]]) -> str:
    """``"<ratio>x (<recipe>)"`` of the highest-ratio record of ``chosen``, or ``-``; among ratios
    equal to two decimals a shipped recipe, then the lower KL, then the first name wins."""
    if not chosen:
        return "-"
    best = min(chosen, key=lambda r: (-round(float(r["ratio"]), 2), r["recipe"] not in SHIPPED, float(r["kl"]),
                                      r["recipe"]))
    return f"{float(best['ratio']):.2f}x ({best['recipe']})"


def best_ratio_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per mode and quality target (:data:`TARGETS`), the highest ratio reached by a
    KakeyaTurbo recipe, by one within 1 MB of per-model data, and by a baseline (``exact`` excluded)."""
    rows = []
    for mode in sorted({r["mode"] for r in records}):
        recs = [r for r in records if r["mode"] == mode and r["recipe"] != "exact"]
        for name, meets in TARGETS:
            ours = [r for r in recs if is_kakeya(r["recipe"]) and meets(r)]
            theirs = [r for r in recs if not is_kakeya(r["recipe"]) and meets(r)]
            rows.append((mode, name, _best(ours), _best([r for r in ours if float(r["bytes_model"]) <= MODEL_MB_BOUND]),
                         _best(theirs)))
    headers = ("mode", "target", "best KakeyaTurbo recipe", "best KakeyaTurbo, ≤ 1 MB per model", "best baseline")
    return markdown_grid(headers, (False,) * 5, rows) + "\n"


def _bits(b: float | None) -> str:
    return "-" if b is None else f"{b:g}"


def layer_bits_table(bench_dir: Path) -> str:
    """Markdown: the K / V bits every layer gets under each recipe of ``results/layer-bits/*.json``
    (written by ``kakeya recipes NAME --layers --json``; ``layer_bits`` is ``[[k, v], ...]``)."""
    files = sorted((bench_dir / "results" / "layer-bits").glob("*.json"))
    plans = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    plans.sort(key=lambda p: (SHIPPED.index(p["recipe"]) if p["recipe"] in SHIPPED else len(SHIPPED), p["recipe"]))
    if not plans:
        return ""
    names = [p["recipe"] for p in plans]
    n_layers = max(len(p["layer_bits"]) for p in plans)
    rows = [(str(i), *(f"{_bits(p['layer_bits'][i][0])} / {_bits(p['layer_bits'][i][1])}" for p in plans))
            for i in range(n_layers)]
    table = markdown_grid(("layer", *(f"{n} K / V" for n in names)), (False,) + (True,) * len(names), rows)
    images = " ".join(f"![bits per layer, {n}](results/layer-bits/{n}.png)" for n in names)
    return table + "\n\n" + images + "\n"


def _note(folder: Path) -> list[str]:
    """The page lines of ``folder/NOTE.md`` (none if there is no note)."""
    note = folder / "NOTE.md"
    return [note.read_text(encoding="utf-8").strip(), ""] if note.exists() else []


def results_page(bench_dir: str | Path) -> str:
    """The Markdown text of ``RESULTS.md`` for the benchmarks folder ``bench_dir``.

    Raises:
        ConfigError: a folder of :data:`SECTIONS` has no records.
        CorruptDataError: a records file has a bad line.
    """
    root = Path(bench_dir)
    ctx1024 = _records(root, "ctx1024")
    out = [
        "# KakeyaTurbo results",
        "",
        "Generated by `kakeya report` from the committed records (`results/*/results.jsonl`, "
        "`results/layer-bits/*.json`) and codec bench tables (`*.md`) of this folder; do not edit by hand "
        "(notes come from each folder's `NOTE.md`). Measured on the 2-core CPU development machine, on "
        "SmolLM2-135M-Instruct (bf16, 30 layers, 3 KV heads, D = 64) and Austen's novels (*Pride and "
        "Prejudice* is calibration text, the other five evaluation text), `n_eval = 128`. Ratios count the "
        "bytes held; \"model MB\" is the per-model data, paid once (see the README).",
        "",
        "## Headline: shipped recipes and the best baselines (ctx 1024, 8 windows)",
        "",
        headline_table(ctx1024),
        "## Best ratio per quality target (ctx 1024, 8 windows)",
        "",
        "KakeyaTurbo = the `kakeya*` and the seed's `v1.*` recipes; the 32-window and ctx-2048 checks below "
        "demote several of these entries.",
        "",
        best_ratio_table(ctx1024),
        "![Pareto plot, ctx 1024](results/ctx1024/pareto.png)",
        "",
    ]
    for section in SECTIONS:
        folder = root / "results" / section.folder
        records = _records(root, section.folder)
        out += [f"## {section.title}", "", f"`results/{section.folder}/`. {section.what}", ""]
        if section.ablation_reference is not None:
            out += [ablation_table(records, section.ablation_reference),
                    f"![ablation](results/{section.folder}/ablation.png)", ""]
        else:
            out += [markdown_table(_ordered(records))]
            if (folder / "pareto.png").exists():
                out += [f"![Pareto plot, {section.folder}](results/{section.folder}/pareto.png)", ""]
        out += _note(folder)
    layers = layer_bits_table(root)
    if layers:
        out += ["## Bits per layer of the shipped recipes", "",
                "From `kakeya recipes NAME --layers --json` (sensitivity-driven layer budgets).", "", layers,
                *_note(root / "results" / "layer-bits")]
    for name, title, what in BENCHES:
        if (root / name).exists():
            out += [f"## {title}", "", f"`{name}`. {what}", "", (root / name).read_text(encoding="utf-8").strip(), ""]
    return "\n".join(out).rstrip() + "\n"


def write_results_page(bench_dir: str | Path, out: str | Path) -> Path:
    """Write :func:`results_page` of ``bench_dir`` to ``out`` (parents created) and return the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results_page(bench_dir), encoding="utf-8")
    return path
