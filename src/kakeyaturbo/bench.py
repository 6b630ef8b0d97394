"""``kakeya bench``: ratio from real bytes, error and speed of codecs on synthetic or captured KV.

Speed is reported as MB/s of bf16-equivalent input (``n·D·2`` bytes per stream), median of
``--repeats`` warm timed calls (each after an untimed one); with ``--recipe`` the rows are timed
round-robin (every row once per round), so that the rows of one run compare as ratios on a shared
machine. This is a benchmark, not a test: it writes JSON and a Markdown table and asserts nothing.

With ``--recipe`` it measures what a recipe's K and V codecs do in the engine: one codec call
on a span of ``--chunks`` chunks of the recipe's ``chunk_tokens`` tokens of ``--kv-heads`` heads,
in the recipe's layout (for the shipped kakeya recipes: joint rows of every KV head, head gains,
Householder-reflector bases, entropy or fixed-width coding by budget, at the recipe's average
budget; calibrated transforms are fitted on another draw of the synthetic KV).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kakeyaturbo import bench_generate, codecs, layouts
from kakeyaturbo.commands.common import device_arg, positive_int
from kakeyaturbo.layouts import CALIBRATED
from kakeyaturbo.recipes.kakeya import PRESETS

# the usual settings of every codec (issue: "every codec at its usual settings")
USUAL: dict[str, list[dict[str, Any]]] = {
    "identity": [{}],
    "fp8": [{}],
    "rotated-int": [{"bits": b} for b in (2, 3, 4, 8)],
    "kivi": [{"bits": b, "axis": "channel"} for b in (2, 4)] + [{"bits": b, "axis": "token"} for b in (2, 4)],
    "turboquant": [{"bits": b} for b in (2, 3, 4)],
    "turboquant-prod": [{"bits": b} for b in (3, 4)],
    "besicovitch": [{"direction_bits": 3, "magnitude_bits": 4}, {"direction_bits": 5, "magnitude_bits": 4}],
    "kakeya": [{"bits": b} for b in (2, 3, 4)],
    "kakeya-v2": [{"bits": b, "stream": "k", "coding": c} for c in ("fixed", "entropy") for b in (2.0, 3.0, 4.0)],
}


def kakeya_grid(d: int) -> list[dict[str, Any]]:
    """The KakeyaTurbo grid: bits {2,3,4} x pca {exact, randomized (rank D/2)} x block {512, 1024}."""
    out = []
    for bits in (2, 3, 4):
        for pca in ("exact", "randomized"):
            for block in (512, 1024):
                cfg: dict[str, Any] = {"bits": bits, "pca": pca, "block_size": block}
                if pca == "randomized":
                    cfg.update(rank=d // 2, variance_ratio=1.0)
                out.append(cfg)
    return out


def synthetic_kv(streams: int, n: int, d: int, seed: int = 0, sample_seed: int | None = None) -> torch.Tensor:
    """KV-like test data ``[streams, n, d]`` float32: a per-stream mean, a decaying spectrum
    (component std ``exp(-i/6)``), a few heavy outlier channels and small isotropic noise.

    ``seed`` fixes the distribution (means, bases); ``sample_seed`` (default: ``seed``) the draw,
    so calibrated codecs can be fitted on another draw of the same distribution."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(streams, 1, d, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(streams, d, d, generator=g))
    spectrum = torch.exp(-torch.arange(d, dtype=torch.float32) / 6.0) * 4.0
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    coeff = torch.randn(streams, n, d, generator=g) * spectrum
    x = mean + coeff @ basis.transpose(-1, -2) + 0.02 * torch.randn(streams, n, d, generator=g)
    x[..., :2] *= 3.0  # outlier channels, as real keys have
    return x


def measure_many(jobs: Sequence[tuple[codecs.Codec, torch.Tensor]], repeats: int = 3, seed: int = 1
                 ) -> list[dict[str, Any]]:
    """:func:`measure` of each ``(codec, x [S, n, D])``, the timings interleaved: each of ``repeats``
    rounds times every job's encode and decode in order, each call made twice and the second timed
    (the first warms what the previous row's calls evicted), and a row's speed is its median over the
    rounds, so that a slow spell of a shared machine falls on every row alike and the rows of one run
    compare as ratios."""
    rows, timed = [], []
    for codec, x in jobs:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        enc = codec.encode(x)
        x_hat = codec.decode(enc).float()
        err = x_hat - x.float()
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(x.shape[0], 64, x.shape[-1], generator=g).to(x.device)
        ip = (q @ err.transpose(-1, -2)).abs() / (q.norm(dim=-1, keepdim=True) * x.float().norm(dim=-1).unsqueeze(-2))
        rows.append({
            "codec": codec.name,
            "config": codec.config.to_dict(),
            "device": str(x.device) if not x.is_cuda else torch.cuda.get_device_name(x.device),
            "shape": list(x.shape),
            "nbytes": enc.nbytes,
            "ratio": x.numel() * 2 / enc.nbytes,
            "bits_per_element": 8 * enc.nbytes / x.numel(),
            "rel_mse": float((err**2).sum() / (x.float() ** 2).sum()),
            "ip_err": float(ip.mean()),
        })
        timed.append((functools.partial(codec.encode, x), functools.partial(codec.decode, enc), sync))
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in jobs]
    for _ in range(repeats):
        for (enc_fn, dec_fn, sync), (t_enc, t_dec) in zip(timed, times):
            for fn, out in ((enc_fn, t_enc), (dec_fn, t_dec)):
                fn()  # warm: what the previous row's calls evicted
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                out.append(time.perf_counter() - t0)
    for row, (_, x), (t_enc, t_dec) in zip(rows, jobs, times):
        row["encode_mb_s"] = x.numel() * 2 / statistics.median(t_enc) / 1e6
        row["decode_mb_s"] = x.numel() * 2 / statistics.median(t_dec) / 1e6
    return rows


def measure(codec: codecs.Codec, x: torch.Tensor, repeats: int = 3, seed: int = 1) -> dict[str, Any]:
    """Ratio, relative MSE, inner-product error and speed (median of ``repeats`` warm timed calls;
    MB/s of bf16 input) of one codec on ``x [S, n, D]``."""
    return measure_many([(codec, x)], repeats, seed)[0]


SPEED_RECIPES = (*PRESETS, "fp8", "rotated-int2", "rotated-int3",
                 "rotated-int4", "rotated-int8", "kivi-2", "kivi-4", "turboquant-2", "turboquant-3", "turboquant-4",
                 "turboquant-prod-3", "turboquant-prod-4")
"""``--recipe shipped``: the shipped kakeya recipes and the baseline recipes."""


def recipe_codecs(name: str, kv_heads: int, head_dim: int, chunks: int, seed: int = 0
                  ) -> Iterator[tuple[str, codecs.Codec, torch.Tensor]]:
    """``(stream, codec, x)`` for K and V of recipe ``name``: ``x`` the codec input of one span of ``chunks``
    chunks of synthetic KV ``[1, kv_heads, T, head_dim]`` in the recipe's layout (a cross-layer group's:
    ``layer_group * kv_heads`` heads side by side); calibrated codecs fitted on another draw, in that layout,
    with the recipe's default (average) budget."""
    from kakeyaturbo import recipes
    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec, KakeyaV2Config, fit_transforms

    recipe = recipes.load(name)
    layout = layouts.LAYOUTS[recipe.layout]
    tokens = chunks * recipe.chunk_tokens
    n_heads = kv_heads * recipe.layer_group
    heads = n_heads if recipe.layout == "joint" else 1
    for i, (stream, sr) in enumerate((("k", recipe.k), ("v", recipe.v))):
        kv = synthetic_kv(n_heads, tokens, head_dim, seed=seed + i).unsqueeze(0)
        x = layout.to_rows(kv, recipe.chunk_tokens)
        cls = codecs.codec_class(sr.codec)
        if cls.needs_calibration:
            fit_kv = synthetic_kv(n_heads, 2048, head_dim, seed=seed + i, sample_seed=seed + 7).unsqueeze(0)
            fit = layout.to_rows(fit_kv, 2048)
            cfg = KakeyaV2Config.for_calibration(sr.config, stream)
            t = fit_transforms(fit.reshape(-1, *fit.shape[-2:]), cfg, heads=heads)
            codec: codecs.Codec = KakeyaV2Codec(dataclasses.replace(cfg, transforms_hash=t.fingerprint()),
                                                transforms=t)
        else:
            codec = cls(**sr.config)
        yield stream, codec, x


def cells(names: list[str], d: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(codec, config) pairs to run for the chosen codec names at head dim ``d``."""
    for name in names:
        grid = kakeya_grid(d) if name == "kakeya" and names == ["kakeya"] else USUAL.get(name, [{}])
        for cfg in grid:
            yield name, cfg


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per measurement: codec, config, D, ratio, bits/elem, errors, speeds."""
    head = "| codec | config | D | ratio | bits/elem | rel. MSE | IP err | enc MB/s | dec MB/s | device |\n"
    head += "|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    lines = []
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        lines.append(
            f"| {r['codec']} | {cfg} | {r['shape'][-1]} | {r['ratio']:.3f}x | {r['bits_per_element']:.3f} | "
            f"{r['rel_mse']:.3e} | {r['ip_err']:.3e} | {r['encode_mb_s']:.1f} | {r['decode_mb_s']:.1f} | "
            f"{r['device']} |"
        )
    return head + "\n".join(lines) + "\n"


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya bench``."""
    p.add_argument("--codec", action="append", metavar="NAME",
                   help="codec to run (repeatable); 'all' runs every registered codec at its usual "
                   "settings; 'kakeya' alone runs the full KakeyaTurbo grid (default: kakeya)")
    p.add_argument("--data", choices=["synthetic", "captured"], default="synthetic",
                   help="synthetic KV-like data, or K/V captured from the default model on evaluation text "
                   "(calibrated codecs are then fitted on its K/V over calibration text)")
    p.add_argument("--layout", choices=list(CALIBRATED), default="head",
                   help="captured data: one vector per (layer, KV head, token), or per (layer, token) with the "
                   "layer's KV heads side by side (the engine's joint layout; calibrated codecs fitted so too)")
    p.add_argument("--dims", type=positive_int, nargs="+", default=[64, 128], help="head dims to test (synthetic data)")
    p.add_argument("--streams", type=positive_int, default=8, help="independent streams (layers x heads) per tensor")
    p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per stream")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median reported)")
    p.add_argument("--recipe", action="append", metavar="NAME",
                   help="measure a recipe's K and V codecs on the engine's codec input (repeatable; 'shipped': the "
                   "shipped kakeya recipes and the baselines); replaces --codec. With --generate: the caches to time")
    p.add_argument("--chunks", type=positive_int, default=16, help="--recipe: chunks of chunk_tokens in one codec call")
    p.add_argument("--kv-heads", type=positive_int, default=3, help="--recipe: KV heads of the synthetic layer")
    p.add_argument("--head-dim", type=positive_int, default=64, help="--recipe: head dim of the synthetic layer")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu or cuda[:N]")
    p.add_argument("--json", type=Path, metavar="P", help="write the results as a JSON list here")
    p.add_argument("--markdown", type=Path, metavar="P", help="write a Markdown table here")
    bench_generate.configure(p)


def _inputs(args: argparse.Namespace, fits: bool) -> list[tuple[str | None, torch.Tensor, torch.Tensor | None]]:
    """``(stream, x, fit)`` per input: ``stream`` "k"/"v" for captured K/V (None for synthetic data),
    ``x [S, n, D]`` what is measured, ``fit`` what calibrated codecs are fitted on when ``fits``:
    another draw of the synthetic distribution, or the same model's K/V on calibration text."""
    if args.data == "captured":
        from kakeyaturbo.models.capture import captured_kv_for_bench

        measured = captured_kv_for_bench(tokens=args.tokens, layout=args.layout)
        fitted = (captured_kv_for_bench(tokens=args.tokens, split="calibration", layout=args.layout) if fits
                  else [None, None])
        return list(zip(("k", "v"), measured, fitted))
    shapes = [(args.streams, args.tokens, d) for d in args.dims]
    return [(None, synthetic_kv(*s), synthetic_kv(*s, sample_seed=1) if fits else None) for s in shapes]


def _recipe_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One row per (recipe, K/V stream) of ``--recipe``."""
    names = [n for name in args.recipe for n in (SPEED_RECIPES if name == "shipped" else (name,))]
    jobs = [(name, stream, codec, x.to(device)) for name in tqdm(names, desc="bench: codecs", unit="recipe")
            for stream, codec, x in recipe_codecs(name, args.kv_heads, args.head_dim, args.chunks)]
    rows = measure_many([(codec, x) for _, _, codec, x in jobs], repeats=args.repeats)
    for row, (name, stream, _, _) in zip(rows, jobs):
        row["settings"] = {"recipe": name, "stream": stream}
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print/write the table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        return bench_generate.run(args)
    device = torch.device(args.device)
    rows = _recipe_rows(args, device) if args.recipe else _codec_rows(args, device)
    table = markdown_table(rows)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0 if all(math.isfinite(r["rel_mse"]) for r in rows) else 1


def _codec_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One row per (input, codec, usual setting) of ``--codec``."""
    names = args.codec or ["kakeya"]
    if "all" in names:
        names = codecs.names()
    for name in names:
        codecs.codec_class(name)
    rows: list[dict[str, Any]] = []
    inputs = _inputs(args, fits=any(codecs.codec_class(n).needs_calibration for n in names))
    jobs = [(stream, x, fit, name, cfg) for stream, x, fit in inputs for name, cfg in cells(names, x.shape[-1])]
    for stream, x, fit, name, cfg in tqdm(jobs, desc="bench", unit="cell"):
        cls = codecs.codec_class(name)
        if cls.needs_calibration:  # fitted on other data (see _inputs), per stream of x
            cfg = {**cfg, "stream": stream} if stream and "stream" in cfg else cfg
            codec = cls.calibrate(fit, **cfg)
        else:
            codec = cls(**cfg)
        row = measure(codec, x.to(device), repeats=args.repeats)
        row["settings"] = cfg
        rows.append(row)
    return rows
