"""Calibration: what recipes need to know about a model, measured once on calibration text.

``kakeya calibrate`` (or :func:`calibrate`) runs the model on the calibration split (never the
evaluation split) and keeps **statistics** only (:mod:`~kakeyaturbo.calibration.statistics`): the
layers' calibration K/V, query Grams, attention mass per lag, the token windows and rotary tables.
Everything a recipe uses is then made **on demand** from them and memoised in the bundle under a
hash of the full config it serves (:mod:`~kakeyaturbo.calibration.fits`: ``kakeya-v2`` transforms,
Σ_q / lag whitening, Lloyd–Max tables; :mod:`~kakeyaturbo.calibration.probes`: the sensitivity
probe of ``layer_bits="sensitivity"`` and the boundary ranking, which run the model):
:func:`prepare` makes what one recipe needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kakeyaturbo.calibration.bundle import Calibration, config_hash, default_bundle_dir
from kakeyaturbo.calibration.probes import prepare
from kakeyaturbo.calibration.statistics import CalibrationSettings, measure
from kakeyaturbo.errors import ConfigError


def calibrate(model: Any, tokenizer: Any, texts: Any, *, windows: int = 8, tokens: int = 1024,
              out: str | Path | None = None, model_name: str | None = None) -> Calibration:
    """Measure the calibration statistics of ``model`` (a few forward passes, no fits).

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        texts: calibration text: a string, a list of strings (joined by blank lines), or a
            :class:`~kakeyaturbo.models.text.Corpus` (its calibration split is used). Keep it
            disjoint from the text you evaluate on.
        windows, tokens: calibration windows of ``tokens`` tokens, spread over the text.
        out: bundle directory to save to (fits are then memoised there); None keeps them in memory.
        model_name: the id recorded in the bundle (default: the model config's name or path).

    Returns:
        The :class:`Calibration`; pass it to :func:`kakeyaturbo.compress`.
    """
    from kakeyaturbo.models.text import Corpus

    if isinstance(texts, Corpus):
        corpus = texts
    elif isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts
                                    and all(isinstance(t, str) for t in texts)):
        text = texts if isinstance(texts, str) else "\n\n".join(texts)
        corpus = Corpus("texts", calibration=text, evaluation="", split_note="all given text is calibration")
    else:
        raise ConfigError(f"texts must be a string, a non-empty list of strings or a Corpus, got "
                          f"{type(texts).__name__}")
    name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    cal = measure(model, tokenizer, corpus, CalibrationSettings(windows=windows, tokens=tokens),
                  model_name=name, text=corpus.name)
    if out is not None:
        cal.save(out)
    return cal


__all__ = ["Calibration", "CalibrationSettings", "calibrate", "config_hash", "default_bundle_dir", "measure",
           "prepare"]
