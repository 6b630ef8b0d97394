"""``kakeya eval``: perplexity, KL and top-1 of recipes against an exact cache on the same windows."""

from __future__ import annotations

import argparse
from pathlib import Path

from kakeyaturbo.commands.common import (
    add_calibration_arg,
    add_model_args,
    load_calibration,
    positive_int,
    statistics_of,
    write_json,
)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya eval``."""
    p.add_argument("--recipe", action="append", required=True, metavar="NAME|FILE",
                   help="recipe to evaluate (repeatable: all run against one reference pass); a built-in name "
                   "(see `kakeya recipes`) or a recipe JSON file")
    add_model_args(p)
    add_calibration_arg(p)
    p.add_argument("--ctx", type=positive_int, default=1024, help="prefill tokens per window (default: %(default)s)")
    p.add_argument("--n-eval", type=positive_int, default=128,
                   help="continuation tokens per window (default: %(default)s)")
    p.add_argument("--windows", type=positive_int, default=8, help="disjoint evaluation windows (default: %(default)s)")
    p.add_argument("--mode", choices=["snapshot", "streaming"], default="snapshot",
                   help="snapshot: compress the prefilled cache once; streaming: also compress the continuation "
                   "as chunks fill, through KakeyaCache (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="P", help="write the result record(s) as JSON")
    p.add_argument("--markdown", type=Path, metavar="P", help="write a Markdown table")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and print the summary table."""
    from kakeyaturbo import recipes
    from kakeyaturbo.evaluation.harness import EvalSettings, Session, evaluate
    from kakeyaturbo.evaluation.report import markdown_table, summary_table

    settings = EvalSettings(model=args.model, text=args.text, ctx=args.ctx, n_eval=args.n_eval,
                            windows=args.windows, mode=args.mode, dtype=args.dtype, device=args.device)
    chosen = [recipes.load(r) for r in args.recipe]
    session = Session(settings)
    calibration = load_calibration(args.calibration, args.model, session.model.config,
                                   required=any(r.needs_calibration for r in chosen),
                                   measure=statistics_of(session.model, session.tokenizer, args.model, args.text))
    records = evaluate(settings, chosen, calibration, session=session)
    print(summary_table(records))
    write_json(args.json, records if len(records) > 1 else records[0])
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(records))
    return 0
