"""Is water-filling's choice of coded components where the measured error is least? (#21: bit allocation)

With ``coding="entropy"`` kakeya-v2 codes every component with a non-zero water-filled width with one
uniform step per vector, prefix-coded into a fixed slot: the allocation left to choose is *which*
components are coded (the rest are truncated to 0), the step then follows from the slot. Water-filling
picks them from Gaussian Lloyd–Max curves of integer widths. This measures the real codec instead: per
(layer, stream), the ``K`` components water-filling codes moved by ``--offsets`` (the highest-variance
ones kept, the slot unchanged), fitted on ``--cal-windows`` calibration windows and coded on one
evaluation window (pre-RoPE keys and values of SmolLM2, the shipped recipes' joint rows with 4-bit head
gains), the relative squared error of each against water-filling's own.

    .venv/bin/python benchmarks/allocation.py --out benchmarks/allocation
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import research  # noqa: E402
from benchmarks.cross_layer import HEAD_GAIN_BITS, SINK_TOKENS, _prefix_kv  # noqa: E402


def _with_active(codec: Any, k: int) -> Any:
    """``codec`` coding the ``k`` highest-variance components instead (same slot: the widths keep their sum)."""
    from kakeyaturbo.codecs.kakeya_v2 import MAX_BITS, KakeyaV2Codec

    t = codec.transforms
    total = int(t.bits.sum())
    if not k <= t.bits.shape[1] or not k <= total <= MAX_BITS * k:
        return None
    order = torch.argsort(t.sigma[0].float(), descending=True)
    widths = torch.zeros_like(t.bits)
    widths[0, order[:k]] = 1
    rest, j = total - k, 0
    while rest:  # only the sum matters to the slot coder; keep each width <= MAX_BITS
        add = min(MAX_BITS - 1, rest)
        widths[0, order[j]] += add
        rest, j = rest - add, j + 1
    moved = dataclasses.replace(t, bits=widths)
    return KakeyaV2Codec(dataclasses.replace(codec.config, transforms_hash=moved.fingerprint()), transforms=moved)


def _error(codec: Any, x: torch.Tensor) -> float:
    y = codec.decode(codec.encode(x[None].to(torch.bfloat16)))[0].float()
    return float((y - x).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec
    from kakeyaturbo.models.arch import facts
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows
    from kakeyaturbo.transforms.rope import Rope

    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
    corpus = load_corpus("austen")
    f = facts(model)
    n_layers, head_dim = f.n_layers, f.head_dim
    ropes = [Rope.from_model(model, i) for i in range(n_layers)]
    with torch.no_grad():
        cal = [_prefix_kv(model, w[None], ropes)[1:] for w in token_windows(
            tokenizer, corpus.calibration, args.cal_windows, args.tokens)]
        ev = _prefix_kv(model, token_windows(tokenizer, corpus.evaluation, 1, args.tokens), ropes)[1:]
    rows = []
    cells = [(b, i, stream) for b in args.bits for i, stream in enumerate("kv")]
    for b, i, stream in tqdm(cells, desc="allocation", unit="stream"):
        for layer in range(n_layers):
            x_cal = torch.cat([c[i][layer, SINK_TOKENS:] for c in cal])
            x_ev = ev[i][layer, SINK_TOKENS:]
            codec = KakeyaV2Codec.calibrate(x_cal[None], bits=b, stream=stream, coding="entropy",
                                            heads=x_cal.shape[1] // head_dim, head_gain_bits=HEAD_GAIN_BITS)
            k0 = int((codec.transforms.bits > 0).sum())
            base = _error(codec, x_ev)
            for offset in args.offsets:
                moved = _with_active(codec, k0 + offset)
                if moved is not None:
                    err = _error(moved, x_ev)
                    rows.append({"bits": b, "stream": stream, "layer": layer, "coded": k0, "offset": offset,
                                 "rel_err": err, "vs_waterfill": err / base})
    return rows


def markdown(rows: list[dict[str, Any]], offsets: list[int]) -> str:
    head = ("| bits | stream | coded (median) | " + " | ".join(f"{o:+d}" for o in offsets)
            + " | best offset (layers) | best of the offsets: median, least |\n")
    head += "|---:|---|---:|" + "---:|" * len(offsets) + "---|---:|\n"
    lines = []
    for b in sorted({r["bits"] for r in rows}):
        for stream in ("k", "v"):
            mine = [r for r in rows if r["bits"] == b and r["stream"] == stream]
            cells = []
            for o in offsets:
                at = [r["vs_waterfill"] for r in mine if r["offset"] == o]
                cells.append(f"{statistics.median(at):.3f}" if len(at) == len({r['layer'] for r in mine}) else "")
            best: dict[int, int] = {}
            oracle = []
            for layer in {r["layer"] for r in mine}:
                own = min((r for r in mine if r["layer"] == layer), key=lambda r: r["vs_waterfill"])
                best[own["offset"]] = best.get(own["offset"], 0) + 1
                oracle.append(own["vs_waterfill"])
            coded = statistics.median(r["coded"] for r in mine if r["offset"] == 0)
            lines.append(f"| {b:g} | {stream} | {coded:g} | " + " | ".join(cells) + " | "
                         + ", ".join(f"{o:+d}: {n}" for o, n in sorted(best.items()))
                         + f" | {statistics.median(oracle):.3f}, {min(oracle):.3f} |")
    note = ("\nMedian over the 30 layers of each offset's relative squared error against water-filling's "
            "(1.000 = the same components; < 1: better). Empty: the offset is out of range for some layer. The last "
            "column picks each layer's best offset on the evaluation window itself (an oracle): what a search over "
            "the truncation point could gain at most.\n")
    return head + "\n".join(lines) + "\n" + note


def main() -> int:
    p = research.parser(__doc__, "benchmarks/allocation", cal_windows=4)
    p.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0], help="bits per element (default: %(default)s)")
    p.add_argument("--offsets", type=int, nargs="+", default=[-16, -8, -4, 0, 4, 8, 16],
                   help="changes to the number of coded components (default: %(default)s)")
    args = p.parse_args()
    rows = run(args)
    return research.write(args.out, "allocation", rows, markdown(rows, args.offsets))


if __name__ == "__main__":
    sys.exit(main())
