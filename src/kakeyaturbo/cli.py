"""The ``kakeya`` command. Each subcommand lives in its own module exposing
``configure(parser)`` and ``run(args) -> int``; modules are imported only when needed."""

from __future__ import annotations

import argparse
import importlib
import sys

from kakeyaturbo.errors import KakeyaError

OUTPUT_FILES = ("json", "markdown", "plot")
"""Arguments naming files a command writes: checked to be writable before the command runs."""

COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("kakeyaturbo.commands.eval", "perplexity, KL and top-1 of recipes against an exact cache"),
    "calibrate": ("kakeyaturbo.commands.calibrate", "measure Σ_q, tables, boundary sensitivity, v2 transforms"),
    "sweep": ("kakeyaturbo.commands.sweep", "resumable grid of evaluations -> results.jsonl, table.md, pareto.png"),
    "diagnose": ("kakeyaturbo.commands.diagnose", "per layer: key-metric error vs the real post-RoPE logit error"),
    "generate": ("kakeyaturbo.commands.generate", "generate text with a compressed cache; report bytes held"),
    "report": ("kakeyaturbo.commands.report", "rebuild benchmarks/RESULTS.md from the committed records"),
    "recipes": ("kakeyaturbo.commands.recipes", "list the built-in recipes or print one as JSON"),
    "bench": ("kakeyaturbo.bench", "codec speed, ratio and error on synthetic or captured KV"),
    "fuzz": ("kakeyaturbo.commands.fuzz", "decode forged containers of every codec; count how each case ends"),
    "store": ("kakeyaturbo.commands.store", "what a vLLM connector's KV store holds: prefixes, tokens, bytes, ratio"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with ``only`` set, imports just that subcommand's module."""
    parser = argparse.ArgumentParser(
        prog="kakeya",
        description="KakeyaTurbo: compress the KV cache of transformer language models, "
        "measure the bytes actually held and the quality lost against an exact cache.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kakeya`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from kakeyaturbo.commands.common import check_output_path

    try:
        check_output_path(*(getattr(args, name, None) for name in OUTPUT_FILES))
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (KakeyaError, OSError) as exc:
        print(f"kakeya {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
