"""``kakeya diagnose``: per layer, the key metric's error next to the real post-RoPE logit error."""

from __future__ import annotations

import argparse
from pathlib import Path

from kakeyaturbo.commands.common import add_calibration_arg, add_model_args, load_calibration, write_json


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya diagnose``."""
    p.add_argument("--recipe", required=True, metavar="NAME|FILE", help="recipe to diagnose")
    add_model_args(p)
    add_calibration_arg(p)
    p.add_argument("--tokens", type=int, default=512,
                   help="window length, from the evaluation text (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="P", help="write the per-layer rows as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the per-layer table."""
    from kakeyaturbo import recipes
    from kakeyaturbo.evaluation.diagnose import layer_errors, markdown
    from kakeyaturbo.evaluation.harness import DTYPES
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows

    recipe = recipes.load(args.recipe)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    calibration = load_calibration(args.calibration, args.model, model.config, required=True)
    ids = token_windows(tokenizer, load_corpus(args.text).evaluation, 1, args.tokens)
    rows = layer_errors(model, ids, recipe, calibration)
    print(markdown(rows, recipe.name))
    write_json(args.json, rows)
    return 0
