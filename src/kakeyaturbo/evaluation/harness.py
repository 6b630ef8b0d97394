"""The model-running harness behind ``kakeya eval``: an exact reference and every candidate recipe
on the same windows, in one process.

Per window of ``ctx + n_eval`` evaluation tokens:

1. prefill ``ctx`` tokens once with an exact ``DynamicCache`` (the reference state);
2. teacher-force the ``n_eval`` continuation on a copy of it: the reference logits;
3. for each recipe, load the prefill K/V into a :class:`~kakeyaturbo.cache.KakeyaCache` (exactly
   what attention hands the cache during a real prefill), then

   * ``snapshot``: decode it once into a plain cache and teacher-force the continuation (new
     tokens stay exact), the seed's method;
   * ``streaming``: teacher-force the continuation through the ``KakeyaCache`` itself, in groups
     that end on chunk boundaries. The cache returns each forward's own tokens exact and encodes
     a chunk once it is full, so this is token-for-token what ``generate()`` would see.

Scored: the predictions of continuation tokens 1..n_eval-1 (``n_eval - 1`` per window). Bytes:
everything the compressed cache holds after the prefill (snapshot) or at the end (streaming),
against the bf16 size of the same tokens.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from kakeyaturbo.cache import KakeyaCache
from kakeyaturbo.calibration.probes import prepare
from kakeyaturbo.engine import CalibrationLike, plan_bits
from kakeyaturbo.errors import ConfigError
from kakeyaturbo.evaluation.metrics import TokenMetrics, summarize, token_metrics
from kakeyaturbo.evaluation.report import MODES, result_record
from kakeyaturbo.models.forward import logits, prefill
from kakeyaturbo.models.loading import load_model
from kakeyaturbo.models.text import load_corpus, token_windows
from kakeyaturbo.recipes import Recipe
from kakeyaturbo.transforms.rope import Rope

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class EvalSettings:
    """What is evaluated, shared by every recipe of one run.

    ``dtype`` is the model's dtype and hence the reference cache's: bfloat16 by default, so the
    exact reference holds exactly the bf16 bytes every ratio is measured against.
    """

    model: str = "smollm2-135m"
    text: str = "austen"
    ctx: int = 1024
    n_eval: int = 128
    windows: int = 8
    mode: str = "snapshot"
    dtype: str = "bfloat16"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, lo in (("ctx", 1), ("n_eval", 2), ("windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    def model_text_dtype(self) -> tuple[str, str, str]:
        """What a loaded :class:`Session` is tied to."""
        return self.model, self.text, self.dtype


class Session:
    """A loaded model with its evaluation windows; reused across recipes (and modes)."""

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings
        self.model, self.tokenizer = load_model(settings.model, dtype=DTYPES[settings.dtype], device=settings.device)
        self.corpus = load_corpus(settings.text)
        self.ids = token_windows(self.tokenizer, self.corpus.evaluation, settings.windows,
                                 settings.ctx + settings.n_eval).to(settings.device)
        self._ropes: dict[int, Rope] = {}

    def rope(self, layer: int) -> Rope:
        """The RoPE of decoder layer ``layer`` (built once)."""
        if layer not in self._ropes:
            self._ropes[layer] = Rope.from_model(self.model, layer)
        return self._ropes[layer]

    def new_cache(self, recipe: Recipe, calibration: CalibrationLike | None) -> KakeyaCache:
        """An empty :class:`KakeyaCache` for this model."""
        return KakeyaCache(self.model.config, recipe, calibration, rope=self.rope)


@dataclass
class _Tally:
    """What one recipe accumulates over the windows: token metrics, bytes held (and their bf16
    equivalent), its per-model bytes and seconds."""

    windows: list[TokenMetrics] = field(default_factory=list)
    held: int = 0
    bf16: int = 0
    model_side: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "encode": 0.0, "decode": 0.0})

    def add(self, metrics: TokenMetrics, report: dict[str, Any], seconds: dict[str, float]) -> None:
        self.windows.append(metrics)
        self.held += report["total"]
        self.bf16 += report["bf16_equivalent"]
        self.model_side = report["model_side"]
        for k, v in seconds.items():
            self.seconds[k] += v


def _groups(total: int, chunk: int) -> list[tuple[int, int]]:
    """Continuation offsets ``[0, total)`` in groups of ``chunk`` (the prefill leaves no hot window,
    so these groups end exactly where the cache completes chunks)."""
    return [(a, min(a + chunk, total)) for a in range(0, total, chunk)]


def evaluate(
    settings: EvalSettings,
    recipes: list[Recipe],
    calibration: CalibrationLike | None = None,
    *,
    session: Session | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate ``recipes`` against one exact reference pass.

    Returns:
        One ``kakeya eval`` record per recipe (see :func:`~kakeyaturbo.evaluation.report.result_record`).
    """
    if not recipes:
        raise ConfigError("no recipe to evaluate")
    s = settings
    session = session or Session(s)
    if session.settings.model_text_dtype() != s.model_text_dtype():
        raise ConfigError("the session was loaded for another model, text or dtype")
    model = session.model
    for r in recipes:  # fits and probes on first use (memoised in the bundle), then a quick read
        prepare(r, calibration, model)
    # fail before the long run on a recipe the model or calibration cannot serve
    budgets = [plan_bits(session.new_cache(r, calibration).plans) for r in recipes]
    tallies = [_Tally() for _ in recipes]
    bar = tqdm(total=s.windows * len(recipes), desc=f"eval {s.mode} ctx={s.ctx}", unit="run", disable=not progress)
    for w in range(s.windows):
        prefix, cont = session.ids[w : w + 1, : s.ctx], session.ids[w : w + 1, s.ctx :]
        t0 = time.perf_counter()
        reference = prefill(model, prefix)
        t_prefill = time.perf_counter() - t0
        ref_logits = logits(model, cont, copy.deepcopy(reference))
        for r, tally in zip(recipes, tallies):
            cache = session.new_cache(r, calibration)
            t1 = time.perf_counter()
            cache.ingest(reference)
            t2 = time.perf_counter()
            if s.mode == "snapshot":
                report = cache.memory_report()
                plain = cache.to_dynamic()
                t3 = time.perf_counter()
                alt_logits = logits(model, cont, plain)
            else:  # decoding happens inside each forward pass: not timed separately
                t3 = t2
                groups = _groups(s.n_eval, r.chunk_tokens)
                alt_logits = torch.cat([logits(model, cont[:, a:b], cache) for a, b in groups])
                report = cache.memory_report()
            tally.add(token_metrics(ref_logits[:-1], alt_logits[:-1], cont[0, 1:]), report,
                      {"prefill": t_prefill, "encode": t2 - t1, "decode": t3 - t2})
            bar.update()
    bar.close()
    records = []
    for r, tally, bits in zip(recipes, tallies, budgets):
        records.append(result_record(
            model=s.model, text=s.text, recipe=r.name, mode=s.mode, ctx=s.ctx, n_eval=s.n_eval,
            summary=summarize(tally.windows), bytes_compressed=tally.held, bytes_bf16=tally.bf16,
            bytes_model=tally.model_side, seconds=tally.seconds,
            extra={"settings": asdict(s), "split": session.corpus.split_note, "layer_bits": bits,
                   "recipe_config": r.to_dict()},
        ))
    return records
