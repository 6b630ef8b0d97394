"""Cross-layer groups: layers whose K (and V) one ``kakeya-v2`` transform codes together.

With ``Recipe.layer_group = G > 1`` the layers a recipe's shared streams serve are cut, per layer type
(full and sliding attention apart) and in order, into runs of ``G`` (the last run of a type may be
shorter): :func:`form`. A group's rows are the joint rows of a layer over the KV heads of all its
members side by side, member-major (:func:`join`: ``[B, G * n_kv, T, D]``, member ``j`` holding heads
``j * n_kv .. (j + 1) * n_kv - 1``), so a basis fitted on them uses the correlation between layers as
the joint layout uses the one between heads (benchmarks/cross-layer: quads of layers code SmolLM2 at
0.42-0.60x the KL of one-layer bases at equal bits). A group is named by its layers, in order; a tuple
of one layer is that layer alone.

A group gives its members one budget per stream, while their sensitivities differ several-fold; with
``Recipe.member_weights="sensitivity"`` each member's heads are weighted by its measured sensitivity
(:func:`kakeyaturbo.engine.member_weights`), so the group's basis and bits go where the KL is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kakeyaturbo.errors import ConfigError

LayerGroup = tuple[int, ...]
"""The layers of one group, increasing."""


def form(layers: Sequence[int], layer_types: Sequence[str], size: int) -> list[LayerGroup]:
    """``layers`` (increasing) cut into groups of ``size`` consecutive members of one layer type each.

    Args:
        layers: the layers to group.
        layer_types: the type of every layer of the model (``layer_types[i]`` of layer ``i``).
        size: members per group (``>= 1``); the last group of a type holds what is left.

    Returns:
        The groups, ordered by their last layer (the order a forward completes them in).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"layer_group must be an integer >= 1, got {size!r}")
    by_type: dict[str, list[int]] = {}
    for layer in layers:
        by_type.setdefault(layer_types[layer], []).append(layer)
    groups = [tuple(run[i : i + size]) for run in by_type.values() for i in range(0, len(run), size)]
    return sorted(groups, key=lambda g: g[-1])


def members(layer: int | LayerGroup) -> LayerGroup:
    """The layers of ``layer``: a layer index (itself alone) or a group."""
    return (layer,) if isinstance(layer, int) else tuple(layer)


def name(group: int | LayerGroup) -> str:
    """``"layer 4"``, ``"layers 4-7"`` (consecutive) or ``"layers 5,11,17"``."""
    layers = members(group)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ",".join(str(i) for i in layers)


def join(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The members' ``[B, n_kv, T, D]`` side by side: ``[B, G * n_kv, T, D]`` (one member: itself)."""
    return xs[0] if len(xs) == 1 else torch.cat(list(xs), dim=1)


def split(x: torch.Tensor, members: int) -> list[torch.Tensor]:
    """Inverse of :func:`join`: ``[B, G * n_kv, T, D]`` -> ``G`` tensors ``[B, n_kv, T, D]``."""
    return list(x.chunk(members, dim=1))
