"""``kakeya sweep``: run a grid of recipes x settings, resumably; write results.jsonl, table.md, pareto.png."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya sweep``."""
    p.add_argument("--grid", type=Path, required=True, metavar="FILE",
                   help="JSON or TOML grid: {'defaults': {...}, 'cells': [{...}], 'grid': {'recipe': [...], "
                   "'mode': [...]}}; keys: model, text, recipe, mode, ctx, n_eval, windows, calibration, device, and "
                   "KakeyaConfig fields (bits, v_bits, layout, coding, head_gain_bits, reflector_bits, layer_bits, "
                   "sink_tokens, ...) that override the config of a kakeya recipe (a preset or generated name); "
                   "the cell's recipe becomes the result's generated name")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder; finished cells in DIR/results.jsonl are skipped on a re-run")
    p.add_argument("--report-only", action="store_true",
                   help="evaluate nothing: rewrite table.md and pareto.png from the cells already finished")
    p.add_argument("--ablation-reference", metavar="RECIPE", default=None,
                   help="also write DIR/ablation.md and DIR/ablation.png: each recipe's bytes, KL and top-1 "
                   "against this recipe's, on the same windows (e.g. kakeya-3b-head-gain0-refl0-fixed-uniform-sink1 "
                   "for benchmarks/sweeps/ablation-ctx1024.json)")


def _evaluator() -> Any:
    from kakeyaturbo import recipes
    from kakeyaturbo.commands.common import load_calibration, statistics_of
    from kakeyaturbo.evaluation.harness import EvalSettings, Session, evaluate

    sessions: dict[tuple[str, str, int, int, int, str], Session] = {}

    def run_group(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
        c = cells[0]
        settings = EvalSettings(model=c["model"], text=c["text"], ctx=c["ctx"], n_eval=c["n_eval"],
                                windows=c["windows"], mode=c["mode"], device=c.get("device", "cpu"))
        key = (settings.model, settings.text, settings.ctx, settings.n_eval, settings.windows, settings.device)
        if key not in sessions:
            sessions.clear()
            sessions[key] = Session(settings)
        session = sessions[key]
        by_cal: dict[Any, list[int]] = {}
        for i, cell in enumerate(cells):
            by_cal.setdefault(cell.get("calibration"), []).append(i)
        results: dict[int, dict[str, Any]] = {}
        for cal_path, idx in by_cal.items():
            chosen = [recipes.load(cells[i]["recipe"]) for i in idx]
            cal = load_calibration(Path(cal_path) if cal_path else None, settings.model, session.model.config,
                                   required=any(r.needs_calibration for r in chosen),
                                   measure=statistics_of(session.model, session.tokenizer, settings.model,
                                                         settings.text))
            for i, rec in zip(idx, evaluate(settings, chosen, cal, session=session)):
                results[i] = {**rec, "recipe_source": cells[i]["recipe"]}  # a built-in name or a file
        return [results[i] for i in range(len(cells))]

    return run_group


def run(args: argparse.Namespace) -> int:
    """Run the sweep."""
    from kakeyaturbo.commands.common import check_output_dir
    from kakeyaturbo.evaluation.sweep import run_sweep

    check_output_dir(args.out)
    records = run_sweep(args.grid, args.out, None if args.report_only else _evaluator(),
                        ablation_reference=args.ablation_reference)
    print(f"{len(records)} cells; results in {args.out / 'results.jsonl'}, table in {args.out / 'table.md'}, "
          f"plot in {args.out / 'pareto.png'}" + (f", ablation in {args.out / 'ablation.md'}"
                                                 if args.ablation_reference else ""))
    return 0
