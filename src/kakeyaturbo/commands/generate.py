"""``kakeya generate``: generate text with a compressed cache; report the bytes it holds and how fast it went."""

from __future__ import annotations

import argparse
from pathlib import Path

from kakeyaturbo.commands.common import (
    add_calibration_arg,
    add_model_args,
    load_calibration,
    megabytes,
    positive_int,
    seed_arg,
    statistics_of,
    write_json,
)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya generate``."""
    p.add_argument("--recipe", required=True, metavar="NAME|FILE", help="recipe for the KV cache")
    p.add_argument("--prompt", required=True, help="prompt text (chat template applied when the tokenizer has one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default: %(default)s)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy decoding")
    p.add_argument("--seed", type=seed_arg, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--decoded-budget", type=megabytes, default=0, metavar="MB",
                   help="keep up to MB of decoded chunks for reuse between steps: faster steps, counted as held "
                   "bytes in the memory report (default: 0, every step decodes what it reads)")
    add_model_args(p)
    add_calibration_arg(p)
    p.add_argument("--json", type=Path, metavar="P",
                   help="write text, new_tokens, timing and the memory report as JSON")


def run(args: argparse.Namespace) -> int:
    """Generate; print the continuation, the memory report and the timing (prefill, per token, tokens/s)."""
    from kakeyaturbo import recipes
    from kakeyaturbo.cache import KakeyaCache
    from kakeyaturbo.errors import ConfigError
    from kakeyaturbo.evaluation.harness import DTYPES
    from kakeyaturbo.generation import timed_generate
    from kakeyaturbo.models.loading import load_model

    recipe = recipes.load(args.recipe)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    calibration = load_calibration(args.calibration, args.model, model.config, required=recipe.needs_calibration,
                                   measure=statistics_of(model, tokenizer, args.model, args.text))
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(args.device)
    if inputs["input_ids"].shape[1] == 0:
        raise ConfigError(f"--prompt {args.prompt!r} gives no tokens (the tokenizer has no chat template to add any)")
    cache = KakeyaCache.from_model(model, recipe, calibration, decoded_budget=args.decoded_budget)
    new, timing = timed_generate(model, inputs, cache, max_new_tokens=args.max_new_tokens, sample=args.sample,
                                 seed=args.seed)
    new = new[0]
    completion = tokenizer.decode(new, skip_special_tokens=True)
    report = cache.memory_report()
    print(completion)
    print(f"\n[{recipe.name}] {report['tokens']} tokens held in {report['total']:,} B "
          f"(bf16: {report['bf16_equivalent']:,} B, ratio {report['ratio']:.2f}x; "
          f"packed {report['packed']:,} B, decoded {report['decoded']:,} B, hot window {report['hot_window']:,} B, "
          f"exact layers {report['exact_layers']:,} B)")
    print(f"[{recipe.name}] {timing.summary()}")
    write_json(args.json, {"text": completion, "new_tokens": int(new.numel()), "timing": timing.to_dict(),
                           "memory": {"bytes_held": report["total"], "bytes_bf16": report["bf16_equivalent"],
                                      "ratio": report["ratio"], "detail": {k: v for k, v in report.items()
                                                                           if k != "layers"}}})
    return 0
