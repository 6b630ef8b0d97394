"""How much a basis over several layers (or heads) lowers the error at equal bits, on SmolLM2's K/V.

The kakeya-v2 transforms are bases over the KV heads of one layer (a token's 192 features). This
measures, before any codec is built, what bases over bigger groups of a token's features would give:

* groups: ``head`` (64 features: one KV head of one layer), ``layer`` (192: today's joint-head basis),
  ``pair`` (two adjacent layers, 384), ``quad`` (four, 768), ``third`` (ten, 1,920);
* K pre-RoPE and V apart; each group's basis the eigenvectors of its covariance on ``--cal-windows``
  windows of calibration text, its mean removed;
* at ``--bits`` bits per element over the whole model, the Gaussian rate-distortion optimum of
  those bases: one water level for every component of every group (reverse water-filling on the
  calibration eigenvalues), each component's error its *evaluation-text* variance times
  ``min(1, level / eigenvalue)`` (out of sample: the basis and the allocation never see the
  evaluation text);
* per-model bytes of the bases at one byte per entry (what int8 matrices would cost; reflector
  bases cost less), against the issue's bound of 1 % of the model's bf16 weights.

The error is relative squared error in each stream's own coordinates (keys unwhitened), an idealised
codec (Gaussian components, ideal entropy coding); it ranks transforms, it is not a codec's figure.

With ``--kl`` it measures instead what the model sees: the real kakeya-v2 codec of the shipped
recipes (``coding="auto"``, 4-bit head gains, 4-bit reflector bases; fitted per block on the
calibration windows' pre-RoPE keys and values), every block of a ``layer`` / ``pair`` / ``quad``
grouping at the same bits, codes the whole prefill cache of each evaluation window (first
``SINK_TOKENS`` tokens exact, RoPE re-applied), and the continuation is teacher-forced on it
(snapshot mode, bf16 model): Δppl, KL and top-1 against the exact cache of the same run, 95 %
bootstrap intervals over windows.

    .venv/bin/python benchmarks/cross_layer.py --out benchmarks/cross-layer
    .venv/bin/python benchmarks/cross_layer.py --kl --windows 8 --bits 1.5 2 2.5 --out benchmarks/cross-layer
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import research  # noqa: E402

GROUPS = {"head": 0, "layer": 1, "pair": 2, "quad": 4, "third": 10}
"""Layers per group (``head``: one KV head of one layer)."""
CODEC_GROUPS = ("head", "layer", "pair", "quad")
"""Groups also measured with a real kakeya-v2 codec (each block fitted and coded at the same bits)."""
KL_GROUPS = ("layer", "pair", "quad")
"""Groups of ``--kl``."""
SINK_TOKENS = 2
"""Leading tokens ``--kl`` keeps exact, as the shipped recipes do."""
SHIPPED = {"coding": "auto", "reflector_bits": 4}
"""kakeya-v2 fields of the shipped recipes ``--kl`` codes with (head gains: ``HEAD_GAIN_BITS`` per KV head;
``--reflector-bits`` replaces the reflector precision)."""
HEAD_GAIN_BITS = 4


def _tokens(caps: list[list[Any]], stream: str) -> torch.Tensor:
    """``[L, T, n_kv * D]``: every layer's features of each token, over all windows."""
    per_window = [torch.stack([getattr(c, "k_pre" if stream == "k" else "v").transpose(0, 1).reshape(
        c.v.shape[1], -1) for c in cap]) for cap in caps]
    return torch.cat(per_window, 1)


def _blocks(x: torch.Tensor, group: str, head_dim: int) -> list[torch.Tensor]:
    """``x [L, T, F]`` cut into the feature blocks ``[T, F']`` of ``group``."""
    n_layers = x.shape[0]
    if group == "head":
        return [x[i, :, h:h + head_dim] for i in range(n_layers) for h in range(0, x.shape[2], head_dim)]
    size = GROUPS[group]
    return [x[i:i + size].permute(1, 0, 2).reshape(x.shape[1], -1) for i in range(0, n_layers, size)]


def _spectra(cal: torch.Tensor, ev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration eigenvalues of one block and the evaluation variance along each eigenvector."""
    mean = cal.double().mean(0)
    a, b = cal.double() - mean, ev.double() - mean
    lam, basis = torch.linalg.eigh(a.T @ a / a.shape[0])
    return lam.clamp_min(1e-12), (b @ basis).pow(2).mean(0)


def _error_at(lam: torch.Tensor, var: torch.Tensor, bits: float) -> float:
    """Relative error at ``bits`` per element under one water level for all components."""
    budget = bits * lam.numel()
    lo, hi = math.log(float(lam.min())) - 50, math.log(float(lam.max()))
    for _ in range(200):  # the level whose rate sum(max(0, log2(lam / level) / 2)) meets the budget
        mid = (lo + hi) / 2
        rate = float((0.5 * torch.log2(lam / math.exp(mid))).clamp_min(0).sum())
        lo, hi = (mid, hi) if rate > budget else (lo, mid)
    level = math.exp(hi)
    return float((var * (level / lam).clamp(max=1.0)).sum() / var.sum())


def _codec_error(cal: list[torch.Tensor], ev: list[torch.Tensor], bits: float, stream: str) -> tuple[float, float]:
    """``(relative error, bits per element held)`` of a kakeya-v2 codec (entropy-coded slots, int8 basis)
    fitted on each calibration block and run on the evaluation block, every block at ``bits``."""
    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec

    err = energy = held = elements = 0.0
    for a, b in zip(cal, ev):
        codec = KakeyaV2Codec.calibrate(a[None], bits=bits, stream=stream, coding="entropy")
        enc = codec.encode(b[None])
        err += float((codec.decode(enc)[0] - b).double().pow(2).sum())
        energy += float((b.double() - a.double().mean(0)).pow(2).sum())
        held, elements = held + 8 * enc.nbytes, elements + b.numel()
    return err / energy, held / elements


def _unblock(blocks: list[torch.Tensor], features: int) -> torch.Tensor:
    """``[L, T, features]`` from blocks ``[T, g * features]`` of ``g`` consecutive layers each (the inverse
    of :func:`_blocks` for groups of layers)."""
    return torch.cat([b.reshape(b.shape[0], -1, features).transpose(0, 1) for b in blocks])


def _prefix_kv(model: Any, ids: torch.Tensor, ropes: list[Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The exact prefill cache of ``ids [1, T]`` and its keys before RoPE and values, each ``[L, T, F]`` float32."""
    from kakeyaturbo.models.forward import prefill

    cache = prefill(model, ids)
    pos = torch.arange(ids.shape[1])
    k = torch.stack([rope.invert(layer.keys[0].float(), pos).transpose(0, 1).reshape(ids.shape[1], -1)
                     for rope, layer in zip(ropes, cache.layers)])
    v = torch.stack([layer.values[0].float().transpose(0, 1).reshape(ids.shape[1], -1) for layer in cache.layers])
    return cache, k, v


def run_kl(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (group, bits) and one for the exact cache rebuilt the same way (a check of the path)."""
    import copy

    from tqdm import tqdm

    from kakeyaturbo.cache import exact_cache
    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec
    from kakeyaturbo.evaluation.metrics import summarize, token_metrics, verdict
    from kakeyaturbo.models.arch import facts
    from kakeyaturbo.models.forward import logits
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows
    from kakeyaturbo.transforms.rope import Rope

    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
    corpus = load_corpus("austen")
    f = facts(model)
    n_layers, n_kv, head_dim = f.n_layers, f.n_kv_heads, f.head_dim
    ropes = [Rope.from_model(model, i) for i in range(n_layers)]
    weights = 2 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        cal = [_prefix_kv(model, w[None], ropes)[1:] for w in token_windows(
            tokenizer, corpus.calibration, args.cal_windows, args.tokens)]
    arms = [(group, b) for group in args.groups for b in args.bits]
    fields = {**SHIPPED, "reflector_bits": args.reflector_bits or SHIPPED["reflector_bits"]}
    codecs = {}
    for group, b in tqdm(arms, desc="fit", unit="arm"):
        for i, stream in enumerate(("k", "v")):
            x = torch.cat([c[i][:, SINK_TOKENS:] for c in cal], 1)  # each window's sink tokens stay exact
            codecs[group, b, stream] = [
                KakeyaV2Codec.calibrate(block[None], bits=b, stream=stream, heads=block.shape[1] // head_dim,
                                        head_gain_bits=HEAD_GAIN_BITS, **fields)
                for block in _blocks(x, group, head_dim)]
    windows = token_windows(tokenizer, corpus.evaluation, args.windows, args.tokens + args.n_eval)
    scores: dict[tuple[str, float], list[Any]] = {arm: [] for arm in [("exact", 0.0), *arms]}
    held: dict[tuple[str, float], int] = dict.fromkeys(scores, 0)
    pos = torch.arange(args.tokens)
    with torch.no_grad():
        for w in tqdm(windows, desc="kl", unit="window"):
            prefix, cont = w[None, : args.tokens], w[None, args.tokens :]
            reference, k, v = _prefix_kv(model, prefix, ropes)
            ref_logits = logits(model, cont, copy.deepcopy(reference))
            for group, b in scores:
                if group == "exact":
                    k_hat, v_hat, nbytes = k, v, 0
                else:
                    parts, nbytes = [], 0
                    for x, stream in ((k, "k"), (v, "v")):
                        coded = []
                        for codec, block in zip(codecs[group, b, stream], _blocks(x[:, SINK_TOKENS:], group, head_dim)):
                            enc = codec.encode(block[None].to(torch.bfloat16))
                            nbytes += enc.nbytes
                            coded.append(codec.decode(enc)[0].float())
                        parts.append(torch.cat([x[:, :SINK_TOKENS], _unblock(coded, n_kv * head_dim)], 1))
                    k_hat, v_hat = parts
                    nbytes += 2 * 2 * n_layers * SINK_TOKENS * n_kv * head_dim
                held[group, b] += nbytes
                states = [(ropes[i].apply(k_hat[i].reshape(-1, n_kv, head_dim).transpose(0, 1), pos,
                                          torch.bfloat16)[None],
                           v_hat[i].reshape(-1, n_kv, head_dim).transpose(0, 1).to(torch.bfloat16)[None])
                          for i in range(n_layers)]
                alt = logits(model, cont, exact_cache(model.config, states, [args.tokens] * n_layers))
                scores[group, b].append(token_metrics(ref_logits[:-1], alt[:-1], cont[0, 1:]))
    bf16 = args.windows * 2 * 2 * n_layers * args.tokens * n_kv * head_dim
    rows = []
    for (group, b), per_window in scores.items():
        summary = summarize(per_window)
        side = sum(c.side_nbytes for s in ("k", "v") for c in codecs[group, b, s]) if group != "exact" else 0
        rows.append({"group": group, "bits": b, "ratio": bf16 / held[group, b] if held[group, b] else None,
                     "delta_ppl_pct": summary.delta_ppl_pct, "delta_ppl_ci95": summary.delta_ppl_ci95,
                     "kl": summary.kl, "kl_ci95": summary.kl_ci95, "top1_pct": summary.top1_pct,
                     "top1_ci95": summary.top1_ci95, "verdict": verdict(summary.delta_ppl_pct, summary.top1_pct),
                     "tokens_scored": summary.tokens_scored, "windows": summary.windows, "ctx": args.tokens,
                     "model_side_mb": side / 1e6, "model_side_share_of_weights": side / weights,
                     "cal_tokens": args.cal_windows * (args.tokens - SINK_TOKENS),
                     "reflector_bits": fields["reflector_bits"]})
    return rows


def markdown_kl(rows: list[dict[str, Any]]) -> str:
    head = ("| group | bits | ratio held | Δppl % [95 % CI] | KL [95 % CI] | top-1 % | verdict | per-model MB | "
            "share of weights |\n|---|---:|---:|---:|---:|---:|---|---:|---:|\n")
    lines = [f"| {r['group']} | {r['bits']:g} | {r['ratio'] or 1:.2f}x | {r['delta_ppl_pct']:+.2f} "
             f"[{r['delta_ppl_ci95'][0]:+.2f}, {r['delta_ppl_ci95'][1]:+.2f}] | {r['kl']:.4f} "
             f"[{r['kl_ci95'][0]:.4f}, {r['kl_ci95'][1]:.4f}] | {r['top1_pct']:.1f} | {r['verdict']} | "
             f"{r['model_side_mb']:.2f} | {r['model_side_share_of_weights']:.2%} |" for r in rows]
    r0 = rows[0]
    note = (f"\nSnapshot mode, SmolLM2-135M bf16, {r0['windows']} evaluation windows of ctx {r0['ctx']:,}, "
            f"{r0['tokens_scored']:,} scored predictions; transforms fitted on {r0['cal_tokens']:,} calibration "
            f"tokens; bases as {r0['reflector_bits']}-bit reflectors. Every block at the same bits (no per-layer "
            "sensitivity budgets), keys pre-RoPE and "
            f"unwhitened, first {SINK_TOKENS} tokens exact; ratio over the whole cache held, exact tokens "
            "included; per-model bytes are the K and V transforms.\n")
    return head + "\n".join(lines) + "\n" + note


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kakeyaturbo.models.capture import capture
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    corpus = load_corpus("austen")
    weights = 2 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        cal = [capture(model, w[None]) for w in token_windows(tokenizer, corpus.calibration, args.cal_windows,
                                                              args.tokens)]
        ev = [capture(model, w[None]) for w in token_windows(tokenizer, corpus.evaluation, args.windows, args.tokens)]
    head_dim = cal[0][0].v.shape[-1]
    rows = []
    for stream in ("k", "v"):
        x_cal, x_ev = _tokens(cal, stream), _tokens(ev, stream)
        for group in GROUPS:
            spectra = [_spectra(a, b) for a, b in zip(_blocks(x_cal, group, head_dim), _blocks(x_ev, group, head_dim))]
            lam, var = torch.cat([s[0] for s in spectra]), torch.cat([s[1] for s in spectra])
            basis_bytes = sum(s[0].numel() ** 2 for s in spectra)
            row = {"stream": stream, "group": group, "blocks": len(spectra), "features": spectra[0][0].numel(),
                   "basis_mb_int8": basis_bytes / 1e6, "basis_share_of_weights": basis_bytes / weights,
                   "cal_tokens": x_cal.shape[1], "eval_tokens": x_ev.shape[1]}
            row |= {f"rel_err_{b:g}": _error_at(lam, var, b) for b in args.bits}
            if group in CODEC_GROUPS:
                blocks = _blocks(x_cal, group, head_dim), _blocks(x_ev, group, head_dim)
                for b in args.bits:
                    row[f"codec_rel_err_{b:g}"], row[f"codec_bits_{b:g}"] = _codec_error(*blocks, b, stream)
            rows.append(row)
    for r in rows:
        ref = next(q for q in rows if q["stream"] == r["stream"] and q["group"] == "layer")
        r |= {f"vs_layer_{b:g}": r[f"rel_err_{b:g}"] / ref[f"rel_err_{b:g}"] for b in args.bits}
        r |= {f"codec_vs_layer_{b:g}": r[f"codec_rel_err_{b:g}"] / ref[f"codec_rel_err_{b:g}"]
              for b in args.bits if f"codec_rel_err_{b:g}" in r}
    return rows


def _codec_cells(r: dict[str, Any], b: float) -> str:
    if f"codec_rel_err_{b:g}" not in r:
        return " | | "
    return f"{r[f'codec_rel_err_{b:g}']:.3e} | {r[f'codec_vs_layer_{b:g}']:.3f} | {r[f'codec_bits_{b:g}']:.3f}"


def markdown(rows: list[dict[str, Any]], bits: list[float]) -> str:
    cols = " | ".join(f"rel. err @ {b:g} b | vs layer | codec rel. err | codec vs layer | codec bits held"
                      for b in bits)
    head = f"| stream | group | features | blocks | bases MB (int8) | share of weights | {cols} |\n"
    head += "|---|---|---:|---:|---:|---:|" + "---:|---:|---:|---:|---:|" * len(bits) + "\n"
    lines = []
    for r in rows:
        cells = " | ".join(f"{r[f'rel_err_{b:g}']:.3e} | {r[f'vs_layer_{b:g}']:.3f} | {_codec_cells(r, b)}"
                           for b in bits)
        lines.append(f"| {r['stream']} | {r['group']} | {r['features']} | {r['blocks']} | {r['basis_mb_int8']:.2f} | "
                     f"{r['basis_share_of_weights']:.2%} | {cells} |")
    r0 = rows[0]
    note = (f"\nBases fitted on {r0['cal_tokens']:,} calibration tokens, errors on {r0['eval_tokens']:,} "
            "evaluation tokens. Idealised columns: one water level over the whole model per stream, Gaussian "
            "rate-distortion. Codec columns: kakeya-v2 (entropy-coded slots, int8 basis, keys centred) fitted on "
            "each block, every block at the same bits; bits held counts its whole payload.\n")
    return head + "\n".join(lines) + "\n" + note


def main() -> int:
    p = research.parser(__doc__, "benchmarks/cross-layer", cal_windows=8)
    p.add_argument("--bits", type=float, nargs="+", default=[1.5, 2.5], help="bits per element (default: 1.5 2.5)")
    p.add_argument("--windows", type=int, default=2, help="evaluation windows (default: %(default)s)")
    p.add_argument("--n-eval", type=int, default=128, help="--kl: continuation tokens scored per window "
                   "(default: %(default)s)")
    p.add_argument("--groups", nargs="+", choices=KL_GROUPS, default=list(KL_GROUPS),
                   help="--kl: groupings to code with (default: all)")
    p.add_argument("--reflector-bits", type=int, default=None,
                   help=f"--kl: reflector precision of the bases (default: {SHIPPED['reflector_bits']}, as shipped)")
    p.add_argument("--kl", action="store_true", help="model quality of the real codec per grouping (see above) "
                   "instead of squared errors; writes kl.json / kl.md (kl-reflectorN.* with --reflector-bits)")
    args = p.parse_args()
    rows = run_kl(args) if args.kl else run(args)
    if args.kl:
        return research.write(args.out, "kl" + (f"-reflector{args.reflector_bits}" if args.reflector_bits else ""),
                              rows, markdown_kl(rows))
    return research.write(args.out, "cross_layer", rows, markdown(rows, args.bits))


if __name__ == "__main__":
    sys.exit(main())
