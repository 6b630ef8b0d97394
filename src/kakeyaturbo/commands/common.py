"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kakeyaturbo.errors import ConfigError

MAX_SEED = 2**63 - 1


def device_arg(value: str) -> str:
    """``--device``: ``cpu`` or ``cuda[:N]`` of a GPU this machine has (checked when the arguments are parsed)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return value


def _integer(value: str, low: int, high: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if high is None and number < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
    if high is not None and not low <= number <= high:
        raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {number}")
    return number


def positive_int(value: str) -> int:
    """An integer argument >= 1."""
    return _integer(value, 1)


def seed_arg(value: str) -> int:
    """A seed argument in ``0..2**63-1``."""
    return _integer(value, 0, MAX_SEED)


def megabytes(value: str) -> int:
    """A size in MB (10^6 bytes; decimals allowed) between 0 and 10^6 MB, as bytes."""
    try:
        mb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size in MB") from None
    if not 0 <= mb <= 1e6:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a size in MB between 0 and 1000000, got {value}")
    return int(mb * 1e6)


def add_model_args(p: Any, device: bool = True) -> None:
    """``--model``, ``--text``, ``--dtype`` and (with ``device``) ``--device`` on a parser or group."""
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (packaged SmolLM2-135M-Instruct, offline), a local Hugging Face model "
                   "folder, or a hub id already in the local cache (default: %(default)s)")
    p.add_argument("--text", default="austen",
                   help="'austen' (Jane Austen's novels: Pride and Prejudice for calibration, the other five for "
                   "evaluation) or the path of a UTF-8 text file (first 20%% calibration, rest evaluation)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="model and reference-cache dtype (default: %(default)s; ratios are always against bf16)")
    if device:
        p.add_argument("--device", default="cpu", type=device_arg, help="cpu or cuda[:N] (default: %(default)s)")


def add_calibration_arg(p: Any) -> None:
    """``--calibration DIR``."""
    p.add_argument("--calibration", type=Path, metavar="DIR",
                   help="calibration bundle from `kakeya calibrate` (needed by recipes that whiten keys, use "
                   "calibrated tables, boundary_top or kakeya-v2); default: the bundle `kakeya calibrate` "
                   "wrote for this model in the cache directory, if any")


def load_calibration(path: Path | None, model_name: str, model_config: Any, required: bool,
                     measure: Callable[[], Any] | None = None) -> Any:
    """The bundle at ``path`` (or, when the recipes need one, the default one for ``model_name``),
    checked against the model's config (unless ``model_config`` is None); None when no recipe needs
    one and no path was given. Without a default bundle, ``measure()`` (when given) measures one,
    which is saved there."""
    from kakeyaturbo.calibration import Calibration, config_hash, default_bundle_dir

    if path is None and not required:
        return None
    where = path or default_bundle_dir(model_name)
    if not (where / "manifest.json").is_file():
        if path is not None or measure is None:
            raise ConfigError(f"no calibration bundle at {where}; run `kakeya calibrate --model {model_name}"
                              f"{'' if path is None else f' --out {path}'}` first")
        print(f"no calibration bundle for {model_name} yet: measuring its statistics into {where} (once)")
        cal = measure()
        cal.save(where)
    else:
        cal = Calibration.load(where)
    if model_config is not None:
        cal.check_model(model_name, config_hash(model_config))
    return cal


def statistics_of(model: Any, tokenizer: Any, model_name: str, text: str) -> Callable[[], Any]:
    """A ``measure`` argument for :func:`load_calibration`: default statistics of ``model`` on the
    calibration split of ``text`` (a ``--text`` value, read only when the statistics are measured)."""
    from kakeyaturbo.calibration import measure
    from kakeyaturbo.models.text import load_corpus

    return lambda: measure(model, tokenizer, load_corpus(text), model_name=model_name, text=text)


def check_output_dir(path: Path | None) -> None:
    """Raise :class:`ConfigError` unless ``path`` (when given) is, or can be made, a writable folder."""
    if path is None:
        return
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"cannot write into {path}: it is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write into {path}: permission denied")
        return
    check_output_path(path)


def check_output_path(*paths: Path | None) -> None:
    """Raise :class:`ConfigError` unless every given path can be written (checked before any work):
    not a directory, and the nearest existing folder above it a writable folder."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"cannot write {path}: it is a directory")
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"cannot write {path}: permission denied")
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"cannot write {path}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write {path}: {parent} is not writable")


def write_json(path: Path | None, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (parents created); no-op without a path."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
