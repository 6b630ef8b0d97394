"""Recipes by name: ``load("v1.3-ppl")`` or ``load("path/to/recipe.json")``; ``names()`` lists built-ins."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from kakeyaturbo.errors import ConfigError
from kakeyaturbo.recipes.recipe import EXACT, Recipe, SensitivityProbe, StreamRecipe

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def _builtin_dir() -> Traversable:
    return resources.files("kakeyaturbo.recipes").joinpath("builtin")


def names() -> list[str]:
    """Names of every built-in recipe, sorted."""
    return sorted(p.name[: -len(".json")] for p in _builtin_dir().iterdir() if p.name.endswith(".json"))


def load(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe JSON file by path.

    Raises:
        ConfigError: neither a built-in name nor an existing file, or the file is not a valid recipe.
    """
    text = str(name_or_path)
    if text in names():
        source = _builtin_dir().joinpath(f"{text}.json")
        return Recipe.from_json(source.read_text(), f"built-in recipe {text!r}")
    path = Path(text)
    if path.is_file():
        return Recipe.from_json(path.read_text(), str(path))
    raise ConfigError(f"unknown recipe {text!r}: not a built-in ({', '.join(names())}) and no such file")


__all__ = ["EXACT", "Recipe", "SensitivityProbe", "StreamRecipe", "load", "names"]
