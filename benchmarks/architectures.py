"""Which recipes run on every supported architecture, and what they hold against transformers' own cache.

Tiny random models of each family (``tests/models/tiny_models.py``: Llama, Mistral with a window on
every layer, Qwen2, Qwen3, Gemma 3 with sliding and full layers, MQA, head_dim 256; bf16, the
SmolLM2 tokenizer, sliding windows of 96 tokens), calibrated on the Austen calibration split
(6 x 512 tokens, what the shipped recipes' probe needs). For each recipe: a prefill of 160
evaluation tokens, then 192 greedy steps through ``kt.compress(model, recipe, calibration)``; the
bytes it holds are measured every 32 steps next to the bytes an exact ``DynamicCache(config=...)``
holds on the same sequence (its sliding layers keep their last ``W - 1`` tokens). Random weights:
bytes and memory only, no quality.

    .venv/bin/python benchmarks/architectures.py            # writes benchmarks/architectures/*.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.models.tiny_models import FAMILIES, SLIDING_FAMILIES, tiny_model  # noqa: E402

import kakeyaturbo as kt  # noqa: E402
from kakeyaturbo.errors import KakeyaError  # noqa: E402
from kakeyaturbo.generation import held_bytes  # noqa: E402
from kakeyaturbo.models.forward import with_cache  # noqa: E402
from kakeyaturbo.models.loading import default_model_dir  # noqa: E402
from kakeyaturbo.models.text import load_corpus, token_windows  # noqa: E402

RECIPES = ("exact", "fp8", "kivi-4", "turboquant-3", "kakeya-quality", "kakeya-balanced", "kakeya-max")
WINDOW, PREFILL, STEPS, EVERY = 96, 160, 192, 32


@torch.no_grad()
def _trace(model: Any, ids: torch.Tensor, cache: Any) -> list[int]:
    """Bytes the cache holds after the prefill and every ``EVERY`` greedy steps."""
    kw = with_cache(model, cache)
    out = model(input_ids=ids, **kw, use_cache=True)
    trace = [held_bytes(cache)]
    for step in range(1, STEPS + 1):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), **kw, use_cache=True)
        if step % EVERY == 0:
            trace.append(held_bytes(cache))
    return trace


def family_rows(family: str, tokenizer: Any, corpus: Any) -> list[dict[str, Any]]:
    """One row per recipe on the tiny model of ``family``."""
    sizes = {"vocab_size": len(tokenizer), "max_position_embeddings": 2048, "bos_token_id": tokenizer.bos_token_id}
    if family in SLIDING_FAMILIES:
        sizes["sliding_window"] = WINDOW
    model = tiny_model(family, "sdpa", **sizes).to(torch.bfloat16)
    calibration = kt.calibrate(model, tokenizer, corpus, windows=6, tokens=512)
    ids = token_windows(tokenizer, corpus.evaluation, 1, PREFILL)
    reference = _trace(model, ids, DynamicCache(config=model.config))
    rows = []
    for name in RECIPES:
        t0 = time.perf_counter()
        try:
            cache = kt.compress(model, name, calibration=calibration)
        except KakeyaError as exc:
            rows.append({"family": family, "recipe": name, "runs": False, "error": str(exc)})
            continue
        trace = _trace(model, ids, cache)
        report = cache.memory_report()
        rows.append({
            "family": family, "recipe": name, "runs": True, "seconds": round(time.perf_counter() - t0, 2),
            "tokens": report["tokens"], "held": trace, "dynamic_cache": reference,
            "ratio": reference[-1] / trace[-1], "bf16_equivalent": report["bf16_equivalent"],
            "reported_ratio": report["ratio"], "exact_layers": sum(layer["exact"] for layer in report["layers"]),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: ratio against DynamicCache at the end, held bytes after the prefill and at the end."""
    lines = ["| model | recipe | runs | ratio vs DynamicCache | held after prefill → end (B) | "
             "DynamicCache after prefill → end (B) |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if not r["runs"]:
            lines.append(f"| {r['family']} | {r['recipe']} | no: {r['error']} | | | |")
            continue
        lines.append(f"| {r['family']} | {r['recipe']} | yes | {r['ratio']:.2f}x | {r['held'][0]:,} → "
                     f"{r['held'][-1]:,} | {r['dynamic_cache'][0]:,} → {r['dynamic_cache'][-1]:,} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "architectures")
    p.add_argument("--family", action="append", choices=FAMILIES, help="default: all")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    corpus = load_corpus("austen")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for family in args.family or FAMILIES:  # written after each family, so a long run keeps what it measured
        rows += family_rows(family, tokenizer, corpus)
        (args.out / "architectures.json").write_text(json.dumps(
            {"window": WINDOW, "prefill": PREFILL, "steps": STEPS, "every": EVERY, "rows": rows}, indent=1))
        (args.out / "architectures.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
