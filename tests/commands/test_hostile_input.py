"""Bad input on the command line ends as one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from kakeyaturbo.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bundle):
    """A tiny Llama folder, a copy with truncated weights, a copy whose tokenizer has no chat
    template, and its calibration bundle."""
    from transformers import AutoTokenizer

    from kakeyaturbo.models.loading import default_model_dir

    model, cal = tiny_bundle
    root = tmp_path_factory.mktemp("hostile")
    good = root / "model"
    model.save_pretrained(good)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(good)
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    plain = root / "plain"
    shutil.copytree(good, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    cal.save(root / "bundle")
    return {"model": good, "truncated": truncated, "plain": plain, "bundle": root / "bundle", "root": root}


def _bundle_with(folders, name, edit):
    """A copy of the bundle whose manifest is ``edit(manifest)``."""
    where = folders["root"] / name
    if not where.exists():
        shutil.copytree(folders["bundle"], where)
        manifest = json.loads((where / "manifest.json").read_text())
        (where / "manifest.json").write_text(json.dumps(edit(manifest)))
    return where


def _recipe(folders, name, content: bytes):
    path = folders["root"] / name
    path.write_bytes(content)
    return path


CASES = {
    "truncated weights": lambda f: ["eval", "--recipe", "fp8", "--model", str(f["truncated"])],
    "cuda without CUDA": lambda f: ["eval", "--recipe", "fp8", "--device", "cuda"],
    "nonsense device": lambda f: ["generate", "--recipe", "fp8", "--prompt", "x", "--device", "nonsense"],
    "json under a file": lambda f: ["eval", "--recipe", "fp8", "--json", "/etc/passwd/out.json"],
    "markdown under a file": lambda f: ["bench", "--markdown", "/etc/passwd/t.md"],
    "calibrate out under a file": lambda f: ["calibrate", "--out", "/etc/passwd/b"],
    "manifest is a list": lambda f: ["recipes", "kakeya-balanced", "--layers", "--model", str(f["model"]),
                                     "--calibration", str(_bundle_with(f, "list", lambda m: [m]))],
    "manifest string for a number": lambda f: [
        "recipes", "kakeya-balanced", "--layers", "--model", str(f["model"]), "--calibration",
        str(_bundle_with(f, "string", lambda m: {**m, "n_kv_heads": "two", "head_dim": "64"}))],
    "empty prompt, no chat template": lambda f: ["generate", "--recipe", "fp8", "--prompt", "", "--model",
                                                 str(f["plain"])],
    "zero new tokens": lambda f: ["generate", "--recipe", "fp8", "--prompt", "x", "--max-new-tokens", "0"],
    "negative new tokens": lambda f: ["generate", "--recipe", "fp8", "--prompt", "x", "--max-new-tokens", "-1"],
    "huge seed": lambda f: ["generate", "--recipe", "fp8", "--prompt", "x", "--sample", "--seed", str(2**70)],
    "binary recipe": lambda f: ["eval", "--recipe", str(_recipe(f, "bin.json", b"\x80\x00\xff"))],
    "recipe without name": lambda f: ["eval", "--recipe", str(_recipe(f, "noname.json", b'{"k": {}}'))],
    "deeply nested recipe": lambda f: ["eval", "--recipe",
                                       str(_recipe(f, "deep.json", b"[" * 100_000 + b"]" * 100_000))],
    "bad codec config in recipe": lambda f: [
        "eval", "--model", str(f["truncated"]), "--recipe",
        str(_recipe(f, "bits.json", b'{"name": "r", "k": {"codec": "kakeya", "config": {"bits": 9}}}'))],
    "bad fuzz count": lambda f: ["fuzz", "--cases", "0"],
    "sweep out under a file": lambda f: ["sweep", "--grid", str(_recipe(f, "grid.json", b"{}")), "--out",
                                         "/etc/passwd/sweep"],
}
"""What each case runs; every one must fail before loading a model, except the truncated weights,
the empty prompt and the bundles (which need the model's config)."""


MESSAGES = {
    "truncated weights": "cannot load model",
    "cuda without CUDA": "no CUDA device is available",
    "nonsense device": "'nonsense' is not a device",
    "manifest is a list": "manifest.json is not a JSON object",
    "manifest string for a number": "manifest 'n_kv_heads' must be a positive integer, got 'two'",
    "empty prompt, no chat template": "gives no tokens",
    "zero new tokens": "must be at least 1, got 0",
    "huge seed": "must be in 0..",
    "binary recipe": "not UTF-8 text",
    "recipe without name": "the field 'name' is missing",
    "deeply nested recipe": "not valid JSON",
    "sweep out under a file": "/etc/passwd is not a folder",
}
"""What the error line says, where the case has a message of its own."""


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_a_nonzero_exit(case, folders, capsys):
    try:
        code = main(CASES[case](folders))
    except SystemExit as exc:  # argparse: usage, then one error line
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None)
    assert err and err[-1].startswith("kakeya ") and ": error: " in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert MESSAGES.get(case, "") in err[-1]


def test_a_bad_recipe_config_is_reported_before_the_model_loads(folders, capsys):
    """The model folder named is broken: the recipe's error must come first."""
    assert main(CASES["bad codec config in recipe"](folders)) == 1
    err = capsys.readouterr().err
    assert "bits must be an integer in 1..4, got 9" in err and "cannot load model" not in err


def test_the_output_path_is_checked_before_any_work(folders, capsys):
    assert main(CASES["json under a file"](folders)) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "/etc/passwd is not a folder" in captured.err
