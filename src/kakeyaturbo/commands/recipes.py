"""``kakeya recipes``: list the built-in recipes, or print one as JSON (a starting point for your own)."""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya recipes``."""
    p.add_argument("name", nargs="?", help="print this recipe as JSON instead of listing all")


def run(args: argparse.Namespace) -> int:
    """List or show."""
    from kakeyaturbo import recipes

    if args.name:
        print(recipes.load(args.name).to_json())
        return 0
    for name in recipes.names():
        r = recipes.load(name)
        print(f"{name:34s} {r.description.split('. ')[0][:100]}")
    return 0
