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

    .venv/bin/python benchmarks/cross_layer.py --out benchmarks/cross-layer
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = {"head": 0, "layer": 1, "pair": 2, "quad": 4, "third": 10}
"""Layers per group (``head``: one KV head of one layer)."""
CODEC_GROUPS = ("head", "layer", "pair", "quad")
"""Groups also measured with a real kakeya-v2 codec (each block fitted and coded at the same bits)."""


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=float, nargs="+", default=[1.5, 2.5], help="bits per element (default: 1.5 2.5)")
    p.add_argument("--cal-windows", type=int, default=8, help="calibration windows (default: %(default)s)")
    p.add_argument("--windows", type=int, default=2, help="evaluation windows (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per window (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/cross-layer"), help="output folder")
    args = p.parse_args()
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_layer.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows, args.bits)
    (args.out / "cross_layer.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
