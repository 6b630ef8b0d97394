"""``kakeya store``: what a KV store directory (the vLLM connector's) holds: blocks, tokens, bytes, ratio."""

from __future__ import annotations

import argparse
from pathlib import Path

from kakeyaturbo.commands.common import write_json


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya store``."""
    p.add_argument("directory", type=Path, metavar="DIR", help="the connector's 'store' directory")
    p.add_argument("--json", type=Path, metavar="P", help="write the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Read every block's header (nothing is decoded) and print one line per (model, recipe)."""
    from kakeyaturbo.errors import ConfigError, CorruptDataError
    from kakeyaturbo.integrations.blocks import read_header
    from kakeyaturbo.integrations.store import KVStore

    if not args.directory.is_dir():
        raise ConfigError(f"{args.directory} is not a directory: pass the connector's 'store' directory")
    store = KVStore(args.directory)
    groups: dict[tuple[str, str], dict[str, int]] = {}
    damaged = 0
    for key, size, _ in store.entries():
        try:
            header, _ = read_header(store.get(key) or b"")
        except CorruptDataError:
            damaged += 1
            continue
        ident = header["identity"]
        g = groups.setdefault((str(ident.get("model")), str(ident.get("recipe"))[:12]),
                              {"blocks": 0, "tokens": 0, "bytes": 0, "bf16_bytes": 0, "prefixes": 0})
        g["blocks"] += 1
        g["tokens"] += header["tokens"]
        g["bytes"] += size
        g["bf16_bytes"] += 2 * 2 * header["tokens"] * header["layers"] * header["n_kv_heads"] * header["head_dim"]
        g["prefixes"] += header["start"] == 0
    rows = [{"model": model, "recipe": recipe, **g, "ratio": g["bf16_bytes"] / g["bytes"]}
            for (model, recipe), g in groups.items()]
    for r in rows:
        print(f"{r['model']}  recipe {r['recipe']}: {r['prefixes']} prefixes, {r['blocks']} blocks, "
              f"{r['tokens']:,} tokens in {r['bytes']:,} B ({r['bytes'] / r['tokens']:,.0f} B/token, "
              f"{r['ratio']:.2f}x fewer than bf16)")
    print(f"{len(store.entries())} files, {damaged} damaged (a miss when looked up)")
    write_json(args.json, {"groups": rows, "damaged": damaged})
    return 0
