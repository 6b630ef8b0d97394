"""``kakeya calibrate``: measure the calibration statistics of a model on the calibration split of
the text and write a bundle directory; ``--recipe`` also makes what named recipes need."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kakeyaturbo.commands.common import add_model_args, check_output_dir, positive_int


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya calibrate``."""
    add_model_args(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="bundle directory to write (default: the model's bundle in the cache directory, which "
                   "`kakeya eval` and `kakeya generate` pick up automatically)")
    p.add_argument("--windows", type=positive_int, default=8, help="calibration windows (default: %(default)s)")
    p.add_argument("--tokens", type=positive_int, default=1024,
                   help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="Σ_q ridge, times mean(diag), of the whitening metrics (default: %(default)s)")
    p.add_argument("--cond-cap", type=float, default=None,
                   help="cap on cond(chol Σ_q) by Tikhonov regularisation (default: none)")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME|FILE",
                   help="also make now what this recipe needs (its kakeya-v2 transforms, sensitivity probe, "
                   "tables), instead of on its first use; repeatable")
    p.add_argument("--force", action="store_true", help="measure again even if the bundle exists (drops its fits)")


def why_remeasure(out: Path, settings: Any) -> str | None:
    """None when ``out`` holds a readable bundle measured with ``settings`` (a ``CalibrationSettings``),
    else why it has to be (re)made."""
    from kakeyaturbo.calibration import Calibration
    from kakeyaturbo.errors import ConfigError, CorruptDataError

    try:
        have = Calibration.load(out).manifest.get("settings", {})
    except (ConfigError, CorruptDataError) as exc:
        if not (out / "manifest.json").is_file():
            return "no bundle there yet"
        return f"the bundle there cannot be used ({exc})"
    want = json.loads(json.dumps(asdict(settings)))
    differ = sorted(k for k in want if have.get(k) != want[k])
    return f"the bundle there was measured with other settings ({', '.join(differ)})" if differ else None


def run(args: argparse.Namespace) -> int:
    """Measure (unless the bundle is already there), then prepare the ``--recipe`` recipes."""
    import shutil

    from kakeyaturbo import recipes
    from kakeyaturbo.calibration import Calibration, CalibrationSettings, default_bundle_dir, measure, prepare
    from kakeyaturbo.evaluation.harness import DTYPES
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus

    out = args.out or default_bundle_dir(args.model)
    check_output_dir(out)
    settings = CalibrationSettings(windows=args.windows, tokens=args.tokens, ridge=args.ridge, cond_cap=args.cond_cap)
    chosen = [recipes.load(r) for r in args.recipe]
    reason = "--force" if args.force else why_remeasure(out, settings)
    if reason is None and not chosen:
        print(f"calibration bundle already at {out} (use --force to measure again)")
        return 0
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if reason is None:
        bundle = Calibration.load(out)
    else:
        print(f"measuring calibration statistics into {out}: {reason}")
        if (out / "fits").is_dir():
            shutil.rmtree(out / "fits")
        bundle = measure(model, tokenizer, load_corpus(args.text), settings, model_name=args.model, text=args.text)
        bundle.save(out)
        print(f"wrote {out} ({sum(t.numel() * t.element_size() for t in bundle.statistics.values()) / 1e6:.1f} MB "
              "of statistics); fits are made on demand and memoised there")
    for recipe in chosen:
        prepare(recipe, bundle, model)
        print(f"prepared {recipe.name}")
    return 0
