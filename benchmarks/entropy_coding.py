"""How many bits a real entropy coder would save over kakeya-v2's fixed slots, at equal error.

For every compressed layer of a recipe (default ``kakeya-balanced``) on the default SmolLM2, K and V
apart: the coefficients its quantiser receives (the recipe's calibrated basis, pre-RoPE whitened keys,
head gains divided out) on ``--windows`` windows of evaluation text, and

* **slots**: what the recipe stores today: its code and scale fields (bits per vector, every vector the
  same) and their squared error in coefficient space (components it does not code count in full);
* **chunk entropy coding**: one uniform step for every component of the stream (reverse water-filling:
  components below the step cost almost nothing), symbols ``round(c / step)``, each component coded
  with a discretised Laplace or Gaussian of the scale measured on calibration text (the family that
  codes the calibration text shorter; a static model, so chunks decode one by one). Its bits are the
  model's code lengths; the step is interpolated (log-log) to the slots' squared error.

Real bytes: where ``constriction`` is installed (``pip install -e .[research]``), the symbols of every
stream are also ANS-coded with those models and the coder's output counted (32-bit words, one stream
per layer and K/V). Head gains, step codes of the slots and headers are outside both counts.

    .venv/bin/python benchmarks/entropy_coding.py --out benchmarks/entropy
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

STEPS = torch.logspace(-3.0, 1.0, 81)
"""Steps tried, in units of each stream's coefficient rms."""
FLOOR = 2.0**-24
"""Smallest symbol probability (what a 24-bit ANS model can represent)."""
RANGE = 1 << 14
"""Symbols are clipped to ±RANGE for the ANS check (counted; none expected)."""


def _coefficients(codec: Any, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The quantiser input ``c [S, n, D]`` of ``rows`` and the fields the quantiser made of it."""
    seen: dict[str, Any] = {}
    quantiser = codec._quantiser
    encode = quantiser.encode

    def spy(c: torch.Tensor) -> dict[str, torch.Tensor]:
        seen["c"], seen["fields"] = c, encode(c)
        return seen["fields"]

    quantiser.encode = spy
    try:
        codec.encode(rows)
    finally:
        quantiser.encode = encode
    return seen["c"], seen["fields"]


def _code_lengths(c: torch.Tensor, step: float, scale: torch.Tensor, laplace: torch.Tensor) -> torch.Tensor:
    """Bits of each coefficient ``c [N, D]`` at ``step`` under each component's model ``[D]``."""
    q = torch.round(c / step)
    lo, hi = (q - 0.5) * step, (q + 0.5) * step
    s = scale.clamp_min(1e-12)
    cdf_l = lambda x: 0.5 + 0.5 * torch.sign(x) * (1 - torch.exp(-x.abs() / s))  # noqa: E731
    cdf_g = lambda x: 0.5 * (1 + torch.erf(x / (s * math.sqrt(2))))  # noqa: E731
    p = torch.where(laplace, cdf_l(hi) - cdf_l(lo), cdf_g(hi) - cdf_g(lo))
    return -torch.log2(p.clamp_min(FLOOR))


def _fit_models(c_cal: torch.Tensor, rms: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per component: Laplace scale, Gaussian std, and which family codes ``c_cal`` shorter (judged at
    a middle step)."""
    b, sd = c_cal.abs().mean(0), c_cal.pow(2).mean(0).sqrt()
    step = 0.1 * rms
    bits_l = _code_lengths(c_cal, step, b, torch.ones_like(b, dtype=torch.bool)).sum(0)
    bits_g = _code_lengths(c_cal, step, sd, torch.zeros_like(b, dtype=torch.bool)).sum(0)
    laplace = bits_l <= bits_g
    return torch.where(laplace, b, sd), laplace, b


def _empirical_bits(c: torch.Tensor, step: float) -> float:
    """Bits per vector of ``round(c / step)`` at each component's empirical entropy over these vectors
    (a bound no memoryless per-component coder beats, its model cost not counted)."""
    q = torch.round(c / step)
    total = 0.0
    for j in range(q.shape[1]):
        counts = torch.unique(q[:, j], return_counts=True)[1].double()
        p = counts / counts.sum()
        total -= float((counts * torch.log2(p)).sum())
    return total / q.shape[0]


def _ans_bits(c: torch.Tensor, step: float, scale: torch.Tensor, laplace: torch.Tensor) -> tuple[int, int] | None:
    """``(bits, clipped)`` of ANS-coding ``round(c / step)`` with the models (None without constriction)."""
    try:
        import constriction
    except ImportError:
        return None
    import numpy as np

    q = torch.round(c / step)
    clipped = int((q.abs() > RANGE).sum())
    q = q.clamp(-RANGE, RANGE).to(torch.int32)
    coder = constriction.stream.stack.AnsCoder()
    s = (scale / step).clamp_min(1e-6).double()
    for family, cols in (("laplace", laplace), ("gaussian", ~laplace)):
        if not bool(cols.any()):
            continue
        model = (constriction.stream.model.QuantizedLaplace if family == "laplace"
                 else constriction.stream.model.QuantizedGaussian)(-RANGE, RANGE)
        sym = q[:, cols].reshape(-1).numpy()
        scales = s[cols].expand(q.shape[0], -1).reshape(-1).numpy()
        coder.encode_reverse(sym, model, np.zeros_like(scales), np.maximum(scales, 1e-3))
    return int(coder.num_bits()), clipped


def _predicted_bits(c: torch.Tensor, c_cal: torch.Tensor, step: float, chunk: int) -> tuple[float, float]:
    """``(bits per vector, squared error)`` of coding each token's coefficients as the residual from
    ``a * previous token's reconstruction`` (per component ``a`` fitted on ``c_cal``; closed loop,
    restarting at every chunk of ``chunk`` tokens so chunks still decode alone), residuals under the
    calibrated Laplace/Gaussian choice of :func:`_fit_models`."""
    prev, cur = c_cal[:-1], c_cal[1:]
    a = (prev * cur).sum(0) / prev.pow(2).sum(0).clamp_min(1e-12)
    resid = cur - a * prev
    scale, laplace, _ = _fit_models(resid, float(resid.pow(2).mean().sqrt()))
    hat = torch.zeros_like(c)
    bits = torch.zeros(c.shape[0])
    for t in range(c.shape[0]):
        guess = a * hat[t - 1] if t % chunk else torch.zeros_like(a)
        r = c[t] - guess
        bits[t] = _code_lengths(r[None], step, scale, laplace).sum()
        hat[t] = guess + torch.round(r / step) * step
    return float(bits.mean()), float((hat - c).pow(2).mean())


def _stream(codec: Any, rows: torch.Tensor, cal_rows: torch.Tensor, chunk: int) -> dict[str, Any]:
    """The comparison for one codec on its evaluation ``rows`` and calibration ``cal_rows`` (chunks of
    ``chunk`` tokens)."""
    c, fields = _coefficients(codec, rows)
    c_cal, _ = _coefficients(codec, cal_rows)
    s, n, d = c.shape
    quantiser = codec._quantiser
    cols = quantiser.columns(c.device)
    c_hat = cols.put(quantiser.decode(fields, s, n, d))
    err_slots = float((c_hat - c).pow(2).mean())
    bits_slots = 8 * sum(fields[k].numel() for k in ("codes", "scale") if k in fields) / (s * n)
    c, c_cal = c.reshape(-1, d), c_cal.reshape(-1, d)
    rms = float(c_cal.pow(2).mean().sqrt())
    scale, laplace, _ = _fit_models(c_cal, rms)
    steps = (STEPS * rms).tolist()
    errs, bits = [], []
    for step in steps:
        errs.append(float((torch.round(c / step) * step - c).pow(2).mean()))
        bits.append(float(_code_lengths(c, step, scale, laplace).sum(1).mean()))
    i = next((k for k in range(1, len(steps)) if errs[k] >= err_slots), None)
    if i is None or errs[i - 1] > err_slots:
        raise SystemExit(f"entropy_coding: the step grid does not bracket the slots' error {err_slots:.3g}")
    t = (math.log(err_slots) - math.log(errs[i - 1])) / (math.log(errs[i]) - math.log(errs[i - 1]))
    step = math.exp(math.log(steps[i - 1]) + t * (math.log(steps[i]) - math.log(steps[i - 1])))
    bits_entropy = float(_code_lengths(c, step, scale, laplace).sum(1).mean())
    ans = _ans_bits(c, step, scale, laplace)
    predicted, predicted_err = _predicted_bits(c, c_cal, step, chunk)
    return {
        "vectors": c.shape[0], "dim": d, "rel_err": err_slots / float(c.pow(2).mean()),
        "slot_bits_per_vector": bits_slots, "entropy_bits_per_vector": bits_entropy,
        "oracle_bits_per_vector": _empirical_bits(c, step),
        "predicted_bits_per_vector": predicted, "predicted_rel_err": predicted_err / float(c.pow(2).mean()),
        "ans_bits_per_vector": ans[0] / c.shape[0] if ans else None, "ans_clipped": ans[1] if ans else None,
        "laplace_components": int(laplace.sum()), "step_over_rms": step / rms,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from kakeyaturbo import recipes
    from kakeyaturbo.calibration.probes import prepare
    from kakeyaturbo.codecs.kakeya_v2 import KakeyaV2Codec
    from kakeyaturbo.commands.common import load_calibration
    from kakeyaturbo.engine import build_plans
    from kakeyaturbo.models.arch import facts
    from kakeyaturbo.models.capture import capture
    from kakeyaturbo.models.loading import load_model
    from kakeyaturbo.models.text import load_corpus, token_windows

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    calibration = load_calibration(None, "smollm2-135m", model.config, required=True)
    recipe = recipes.load(args.recipe)
    prepare(recipe, calibration, model)
    f = facts(model)
    plans = build_plans(recipe, f.n_layers, f.n_kv_heads, f.head_dim, calibration)
    corpus = load_corpus("austen")
    with torch.no_grad():
        ev = [capture(model, w[None]) for w in token_windows(tokenizer, corpus.evaluation, args.windows, args.tokens)]
        cal = [capture(model, w[None]) for w in token_windows(tokenizer, corpus.calibration, args.windows, args.tokens)]

    def rows(plan: Any, caps: list[Any], stream: str) -> torch.Tensor:
        x = torch.cat([getattr(c[plan.layer], "k_pre" if stream == "k" else "v") for c in caps], 1)
        return plan._to_rows(x[None])

    out = []
    for plan in tqdm([p for p in plans if not p.exact], desc="entropy coding", unit="layer"):
        for stream, codec in (("k", plan.k_codec), ("v", plan.v_codec)):
            if not isinstance(codec, KakeyaV2Codec):
                continue
            row = _stream(codec, rows(plan, ev, stream), rows(plan, cal, stream), plan.chunk_tokens)
            coding = "entropy" if codec.config.entropy_coded else "fixed"
            out.append({"layer": plan.layer, "stream": stream, "coding": coding, **row})
    return out


def _bits(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def markdown(rows: list[dict[str, Any]], recipe: str, tokens: int) -> str:
    head = ("| layer | stream | coding | slot bits/vec | entropy bits/vec | ANS bits/vec | oracle bits/vec | "
            "predicted bits/vec | saving | rel. err | predicted rel. err |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['layer']} | {r['stream']} | {r['coding']} | {r['slot_bits_per_vector']:.1f} | "
             f"{r['entropy_bits_per_vector']:.1f} | "
             f"{_bits(r['ans_bits_per_vector'])} | {r['oracle_bits_per_vector']:.1f} | "
             f"{r['predicted_bits_per_vector']:.1f} | "
             f"{1 - r['entropy_bits_per_vector'] / r['slot_bits_per_vector']:+.1%} | {r['rel_err']:.2e} | "
             f"{r['predicted_rel_err']:.2e} |"
             for r in rows]
    kinds = ("slot", "entropy", "ans", "oracle", "predicted")
    total = {k: sum(r[f"{k}_bits_per_vector"] or 0 for r in rows) for k in kinds}
    summary = (f"\n{recipe}, {tokens} evaluation tokens per stream: all streams together "
               f"{total['slot']:.0f} slot bits per token, {total['entropy']:.0f} with chunk entropy coding at "
               f"equal error ({1 - total['entropy'] / total['slot']:+.1%})"
               + (f", {total['ans']:.0f} ANS-coded ({1 - total['ans'] / total['slot']:+.1%})" if total["ans"] else "")
               + f"; the empirical-entropy bound at that step: {total['oracle']:.0f} "
               f"({1 - total['oracle'] / total['slot']:+.1%}); predicted from the previous token: "
               f"{total['predicted']:.0f} ({1 - total['predicted'] / total['slot']:+.1%}).\n")
    return head + "\n".join(lines) + "\n" + summary


def main() -> int:
    p = research.parser(__doc__, "benchmarks/entropy")
    p.add_argument("--recipe", default="kakeya-balanced", help="a kakeya recipe (default: %(default)s)")
    p.add_argument("--windows", type=int, default=2, help="windows of text per split (default: %(default)s)")
    args = p.parse_args()
    rows = run(args)
    return research.write(args.out, args.recipe, rows, markdown(rows, args.recipe, args.windows * args.tokens))


if __name__ == "__main__":
    sys.exit(main())
