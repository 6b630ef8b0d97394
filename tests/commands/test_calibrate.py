"""``kakeya calibrate`` reuses a bundle only when it was measured with the settings asked for."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kakeyaturbo.calibration import Calibration
from kakeyaturbo.commands.calibrate import why_remeasure
from tests.conftest import SETTINGS, TEXT, TINY_PROBE


@pytest.mark.model
def test_why_remeasure(tmp_path, tiny_bundle):
    _, cal = tiny_bundle
    assert why_remeasure(tmp_path / "none", SETTINGS) == "no bundle there yet"
    Calibration(cal.manifest, cal.statistics).save(tmp_path / "b")
    assert why_remeasure(tmp_path / "b", SETTINGS) is None
    other = dataclasses.replace(SETTINGS, windows=3, ridge=0.01)
    assert why_remeasure(tmp_path / "b", other) == ("the bundle there was measured with other settings "
                                                    "(ridge, windows)")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 2}))
    assert "cannot be used" in why_remeasure(tmp_path / "b", SETTINGS)
    assert "kakeya calibrate --force --model tiny" in why_remeasure(tmp_path / "b", SETTINGS)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_bundle):
    """The tiny Llama saved as a local model folder, and a text file long enough for default calibration."""
    from transformers import AutoTokenizer

    from kakeyaturbo.models.loading import default_model_dir

    model, _ = tiny_bundle
    root = tmp_path_factory.mktemp("tiny-folder")
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Letter {i}. {TEXT[: 6000]}" for i in range(40)))
    return root / "model", text


@pytest.mark.model
def test_calibrate_prefits_a_recipe_then_eval_reads_it(tmp_path, tiny_folder, monkeypatch, capsys):
    from kakeyaturbo.cli import main

    model, text = tiny_folder
    monkeypatch.setenv("KAKEYA_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "spread.json"
    recipe.write_text(json.dumps({
        "name": "spread", "sink_tokens": 1, "chunk_tokens": 16, "layer_bits": "sensitivity", "probe": TINY_PROBE,
        "k": {"codec": "kakeya-v2", "config": {"bits": 2.5}}, "v": {"codec": "kakeya-v2", "config": {"bits": 2.5}},
    }))
    bundle = tmp_path / "b"
    common = ["--model", str(model), "--text", str(text), "--dtype", "float32"]
    assert main(["calibrate", *common, "--out", str(bundle), "--windows", "2", "--tokens", "96",
                 "--recipe", str(recipe)]) == 0
    assert "prepared spread" in capsys.readouterr().out
    fits = sorted(p.name for p in (bundle / "fits").iterdir())
    assert any(f.startswith("sensitivity-") for f in fits) and any(f.startswith("v2-") for f in fits)
    evaluated = ["eval", "--recipe", str(recipe), *common, "--ctx", "48", "--n-eval", "16", "--windows", "1"]
    assert main([*evaluated, "--calibration", str(bundle), "--json", str(tmp_path / "r.json")]) == 0
    assert sorted(p.name for p in (bundle / "fits").iterdir()) == fits  # everything was read back
    assert json.loads((tmp_path / "r.json").read_text())["recipe"] == "spread"
    assert main(evaluated) == 0  # no default bundle yet: it is measured (8 x 1024 tokens), then fitted
    assert "measuring its statistics" in capsys.readouterr().out
    assert any((tmp_path / "cache" / "calibration").rglob("sensitivity-*.safetensors"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "bundle_version": 2}))
    assert main([*evaluated, "--calibration", str(bundle)]) == 1
    assert f"rebuild it with `kakeya calibrate --force --model {model} --out {bundle}`" in capsys.readouterr().err
