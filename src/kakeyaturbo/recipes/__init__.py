"""Recipes by name: ``load("kakeya-balanced")``, ``load("kakeya-3b-head")`` or ``load("path/to/recipe.json")``.

A name is a preset of the kakeya-v2 family (:data:`~kakeyaturbo.recipes.kakeya.PRESETS`), a built-in
JSON recipe, or a generated kakeya name (:class:`~kakeyaturbo.recipes.kakeya.KakeyaConfig`);
``names()`` lists the presets and built-ins.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.recipes.kakeya import PREFIX, PRESETS, KakeyaConfig
from kakeyaturbo.recipes.recipe import EXACT, Recipe, SensitivityProbe, StreamRecipe

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def _builtin_dir() -> Traversable:
    return resources.files("kakeyaturbo.recipes").joinpath("builtin")


def _builtin_names() -> list[str]:
    return [p.name[: -len(".json")] for p in _builtin_dir().iterdir() if p.name.endswith(".json")]


def names() -> list[str]:
    """Names of every preset and built-in recipe, sorted (generated kakeya names are not listed)."""
    return sorted([*PRESETS, *_builtin_names()])


def load(name_or_path: str | Path) -> Recipe:
    """A preset, a built-in recipe or a generated kakeya name's recipe by name, or a recipe JSON file by path.

    Raises:
        ConfigError: none of those (a ``kakeya-`` name that does not parse says why), or the file is
            not a valid recipe.
    """
    text = str(name_or_path)
    if text in PRESETS:
        return PRESETS[text].recipe(text)
    if text in _builtin_names():
        source = _builtin_dir().joinpath(f"{text}.json")
        return Recipe.from_json(source.read_text(), f"built-in recipe {text!r}")
    path = Path(text)
    if path.is_file():
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read recipe file {path}: {exc.strerror or exc}") from None
        return Recipe.from_json(raw, str(path))
    if text.startswith(PREFIX):
        try:
            return KakeyaConfig.from_name(text).to_recipe()
        except ConfigError as exc:
            raise ConfigError(f"unknown recipe {text!r}: not a preset or built-in, no such file, and {exc}") from None
    raise ConfigError(f"unknown recipe {text!r}: not a preset or built-in ({', '.join(names())}), "
                      "not a generated kakeya name and no such file")


__all__ = ["EXACT", "KakeyaConfig", "Recipe", "SensitivityProbe", "StreamRecipe", "load", "names"]
