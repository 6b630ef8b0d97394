"""``kakeya calibrate``: measure Σ_q, Lloyd–Max tables, boundary sensitivity and v2 transforms on
the calibration split of the text, and write a bundle directory."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kakeyaturbo.calibration.run import V2_BITS, V2_KEY_SPACES, V2_PROBE_BITS
from kakeyaturbo.codecs.kakeya_v2 import LAYOUTS
from kakeyaturbo.commands.common import add_model_args


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya calibrate``."""
    add_model_args(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="bundle directory to write (default: the model's bundle in the cache directory, which "
                   "`kakeya eval` and `kakeya generate` pick up automatically)")
    p.add_argument("--windows", type=int, default=8, help="calibration windows (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--ridge", type=float, default=1e-3, help="Σ_q ridge, times mean(diag) (default: %(default)s)")
    p.add_argument("--cond-cap", type=float, default=None,
                   help="cap on cond(chol Σ_q) by Tikhonov regularisation (default: none)")
    p.add_argument("--v2-bits", type=float, nargs="+", default=None, metavar="B",
                   help="bit budgets to fit kakeya-v2 transforms for (default: "
                   f"{' '.join(f'{b:g}' for b in V2_BITS)})")
    p.add_argument("--v2-key-space", nargs="+", default=["none"], choices=list(V2_KEY_SPACES),
                   help="key spaces to fit kakeya-v2 key transforms in at every budget: Σ_q or lag whitening "
                   "(folded into the basis), raw pre-RoPE or post-RoPE keys (default: none, what the "
                   "built-in recipes use)")
    p.add_argument("--v2-key-mean", nargs="+", default=["with", "without"], choices=["with", "without"],
                   help="fit the kakeya-v2 key transforms with and/or without a static mean (default: both)")
    p.add_argument("--v2-layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                   help="engine layouts to fit the default kakeya-v2 transforms for: 'head' (one per KV head) "
                        "and 'joint' (one per layer over its KV heads concatenated, for recipes with "
                        "\"layout\": \"joint\"; default: both)")
    p.add_argument("--v2-joint-head-gain-bits", type=int, nargs="*", default=[4], metavar="B",
                   help="also fit the joint-layout transforms with a B-bit gain per KV head (recipes with "
                   "\"head_gain_bits\": B), at every budget; none skips them (default: %(default)s)")
    p.add_argument("--v2-joint-reflector-bits", type=int, nargs="*", default=[3, 4], metavar="B",
                   help="also fit every head-gain joint transform with its basis stored as Householder reflectors "
                   "of at least B bits (recipes with \"reflector_bits\": B; a third (B=3) to 40 %% (B=4) of the int8 "
                   "basis' bytes); none skips them (default: %(default)s)")
    p.add_argument("--v2-ablation", type=float, default=3.0, metavar="B",
                   help="also fit, at budget B, every key space with and without a mean, values with a "
                   "mean, and each single fit option switched off (no gain, no group rotation, uniform "
                   "bits): what the ablation "
                   "recipes in benchmarks/recipes/ablation need; 0 skips them (default: %(default)s)")
    p.add_argument("--v2-probe-bits", type=float, nargs="*", default=None, metavar="B",
                   help="budgets at which each (layer, stream) is coded alone and the KL it causes measured "
                   "(float32), for recipes with layer_bits \"sensitivity\"; give none to skip (default: "
                   f"those of {' '.join(f'{b:g}' for b in V2_PROBE_BITS)} that are fitted, when the default "
                   "key fit is: key space none, with the mean)")
    p.add_argument("--v2-probe-windows", type=int, default=6, metavar="N",
                   help="calibration windows the v2 sensitivity probe scores, at most --windows (default: "
                   "%(default)s)")
    p.add_argument("--force", action="store_true", help="recalibrate even if the bundle exists")


def why_recalibrate(out: Path, settings: Any) -> str | None:
    """None when ``out`` holds a readable bundle made with ``settings`` (a ``CalibrationSettings``),
    else why it has to be (re)made."""
    from kakeyaturbo.calibration import Calibration
    from kakeyaturbo.errors import ConfigError, CorruptDataError

    try:
        have = Calibration.load(out).manifest.get("settings", {})
    except ConfigError:
        return "no bundle there yet"
    except CorruptDataError as exc:
        return f"the bundle there cannot be used ({exc})"
    want = json.loads(json.dumps(asdict(settings)))
    differ = sorted(k for k in want if have.get(k) != want[k])
    return f"the bundle there was made with other settings ({', '.join(differ)})" if differ else None


def run(args: argparse.Namespace) -> int:
    """Calibrate and save the bundle."""
    from kakeyaturbo.calibration import CalibrationSettings, calibrate, default_bundle_dir
    from kakeyaturbo.evaluation.harness import DTYPES
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus

    out = args.out or default_bundle_dir(args.model)
    v2_bits = tuple(args.v2_bits) if args.v2_bits else V2_BITS
    default_fit = "none" in args.v2_key_space and "with" in args.v2_key_mean
    probe = tuple(b for b in V2_PROBE_BITS if b in v2_bits and default_fit) if args.v2_probe_bits is None \
        else tuple(args.v2_probe_bits)
    extra = {"v2_bits": v2_bits, "v2_probe_bits": probe if len(probe) > 1 else ()}
    settings = CalibrationSettings(windows=args.windows, tokens=args.tokens, ridge=args.ridge, cond_cap=args.cond_cap,
                                   v2_key_spaces=tuple(args.v2_key_space),
                                   v2_key_center=tuple(m == "with" for m in args.v2_key_mean),
                                   v2_layouts=tuple(dict.fromkeys(args.v2_layouts)),
                                   v2_joint_head_gain_bits=tuple(args.v2_joint_head_gain_bits)
                                   if "joint" in args.v2_layouts else (),
                                   v2_joint_reflector_bits=tuple(args.v2_joint_reflector_bits)
                                   if "joint" in args.v2_layouts and args.v2_joint_head_gain_bits else (),
                                   v2_ablation_bits=args.v2_ablation or None,
                                   v2_probe_windows=min(args.v2_probe_windows, args.windows), **extra)
    reason = "--force" if args.force else why_recalibrate(out, settings)
    if reason is None:
        print(f"calibration bundle already at {out} (use --force to redo)")
        return 0
    print(f"calibrating into {out}: {reason}")
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    bundle = calibrate(model, tokenizer, load_corpus(args.text), settings, model_name=args.model, text=args.text)
    bundle.save(out)
    skipped = bundle.skipped_whitening
    print(f"wrote {out} ({bundle.nbytes / 1e6:.2f} MB of tensors); whitening skipped on "
          f"{len(skipped)} layer(s){': ' + ', '.join(f'{k} ({v})' for k, v in skipped.items()) if skipped else ''}")
    print(f"boundary ranking (most sensitive first): {bundle.boundary_ranking[:10]}")
    return 0
