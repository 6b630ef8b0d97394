"""``kakeya bench --generate``: generation speed with a compressed cache against ``DynamicCache``.

For each context length the default model (or ``--model``) prefills ``ctx`` tokens of evaluation
text and generates ``--steps`` tokens greedily, once with transformers' ``DynamicCache`` and once
per (recipe, decoded budget), the caches interleaved within each of ``--repeats`` rounds so that
every ratio compares runs made side by side on the same machine. Reported per row: prefill and
median per-token step (seconds, and as ratios to ``DynamicCache`` of the same round, median over
rounds), tokens/s, the bytes held after the last step against what ``DynamicCache`` holds (bf16),
and how the held bytes moved between steps (``max_step_growth``: the largest increase over one
step, against ``bf16_per_token``, what an exact cache adds per token). This is a benchmark, not a
test: it writes JSON and a Markdown table and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

DEFAULT_RECIPES = ("exact", "fp8", "kivi-4", "rotated-int4", "turboquant-3", "kakeya-balanced", "kakeya-extreme")
DYNAMIC = "DynamicCache"


def configure(p: argparse.ArgumentParser) -> None:
    """The ``--generate`` options of ``kakeya bench``."""
    from kakeyaturbo.commands.common import add_calibration_arg, add_model_args, megabytes, positive_int

    g = p.add_argument_group("generation benchmark (with --generate)")
    g.add_argument("--generate", action="store_true",
                   help="time generation with compressed caches against DynamicCache instead of codecs; "
                   f"--recipe names the caches (default: {', '.join(DEFAULT_RECIPES)})")
    g.add_argument("--ctx", type=positive_int, nargs="+", default=[1024], metavar="T",
                   help="prompt lengths in tokens (default: %(default)s)")
    g.add_argument("--steps", type=positive_int, default=32, help="tokens generated per run (default: %(default)s)")
    g.add_argument("--decoded-budget", type=megabytes, nargs="+", default=[0], metavar="MB",
                   help="decoded-chunk budgets to time each recipe with (default: 0)")
    add_model_args(g, device=False)  # --device is the codec bench's
    add_calibration_arg(g)


def _time_one(model: Any, ids: torch.Tensor, make_cache: Any, steps: int) -> dict[str, Any]:
    from kakeyaturbo.generation import held_bytes, timed_generate

    cache = make_cache()
    held: list[int] = []
    _, timing = timed_generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache,
                               max_new_tokens=steps, on_token=lambda: held.append(held_bytes(cache)))
    growth = max((b - a for a, b in zip(held, held[1:])), default=0)
    return {"prefill_s": timing.prefill_s, "per_token_s": timing.per_token_s, "tokens_per_s": timing.tokens_per_s,
            "bytes_held": held[-1], "max_step_growth": growth}


def run(args: argparse.Namespace) -> int:
    """Run the side-by-side and write ``--json`` / ``--markdown`` (default: ``benchmarks/generate.*``)."""
    from kakeyaturbo import recipes
    from kakeyaturbo.cache import KakeyaCache
    from kakeyaturbo.calibration.probes import prepare
    from kakeyaturbo.commands.common import load_calibration, statistics_of
    from kakeyaturbo.evaluation.harness import DTYPES
    from kakeyaturbo.models.arch import facts
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows

    chosen = [recipes.load(r) for r in (args.recipe or DEFAULT_RECIPES)]
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    calibration = load_calibration(args.calibration, args.model, model.config,
                                   required=any(r.needs_calibration for r in chosen),
                                   measure=statistics_of(model, tokenizer, args.model, args.text))
    for r in chosen:  # fits and probes first, so no run times them
        prepare(r, calibration, model)
    f = facts(model)
    per_token = 2 * 2 * f.n_kv_heads * f.head_dim * f.n_layers
    cells = [(DYNAMIC, 0)] + [(r.name, b) for r in chosen for b in args.decoded_budget]
    by_name = {r.name: r for r in chosen}
    rows = []
    corpus = load_corpus(args.text)
    for ctx in args.ctx:
        ids = token_windows(tokenizer, corpus.evaluation, 1, ctx).to(args.device)
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {cell: [] for cell in cells}
        with tqdm(total=args.repeats * len(cells), desc=f"bench --generate ctx={ctx}", unit="run") as bar:
            for _ in range(args.repeats):
                for name, budget in cells:
                    def make(name: str = name, budget: int = budget) -> Any:
                        if name == DYNAMIC:
                            return DynamicCache(config=model.config)
                        return KakeyaCache.from_model(model, by_name[name], calibration, decoded_budget=budget)
                    rounds[name, budget].append(_time_one(model, ids, make, args.steps))
                    bar.update()
        reference = rounds[DYNAMIC, 0]
        for (name, budget), runs in rounds.items():
            med = {k: statistics.median(r[k] for r in runs) for k in ("prefill_s", "per_token_s", "tokens_per_s")}
            rows.append({
                "cache": name, "decoded_budget_mb": budget / 1e6, "ctx": ctx, "steps": args.steps,
                "repeats": args.repeats, **med,
                "step_vs_dynamic": statistics.median(r["per_token_s"] / d["per_token_s"]
                                                     for r, d in zip(runs, reference)),
                "prefill_vs_dynamic": statistics.median(r["prefill_s"] / d["prefill_s"]
                                                        for r, d in zip(runs, reference)),
                "bytes_held": runs[-1]["bytes_held"], "bytes_dynamic": reference[-1]["bytes_held"],
                "ratio": reference[-1]["bytes_held"] / runs[-1]["bytes_held"],
                "max_step_growth": max(r["max_step_growth"] for r in runs), "bf16_per_token": per_token,
                "model": args.model, "device": str(args.device), "dtype": args.dtype,
            })
    table = markdown_table(rows)
    print(table)
    out_json = args.json or Path("benchmarks/generate.json")
    out_md = args.markdown or out_json.with_suffix(".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(rows, indent=1))
    out_md.write_text(table)
    return 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per (ctx, cache, decoded budget)."""
    head = ("| ctx | cache | decoded budget MB | prefill s | ms/token | tokens/s | step vs DynamicCache | "
            "prefill vs DynamicCache | ratio held | max growth per step (B) |\n")
    head += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = [f"| {r['ctx']} | {r['cache']} | {r['decoded_budget_mb']:g} | {r['prefill_s']:.2f} | "
             f"{r['per_token_s'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | {r['step_vs_dynamic']:.2f}x | "
             f"{r['prefill_vs_dynamic']:.2f}x | {r['ratio']:.2f}x | {r['max_step_growth']:,} |" for r in rows]
    note = (f"\nExact bf16 growth per token: {rows[0]['bf16_per_token']:,} B. Ratios of runs made side by side, "
            f"median of {rows[0]['repeats']} rounds.\n") if rows else ""
    return head + "\n".join(lines) + "\n" + note
