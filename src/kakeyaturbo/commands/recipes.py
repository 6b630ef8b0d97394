"""``kakeya recipes``: list the presets and built-in recipes, print one as JSON (a starting point for your
own), or show the bits each layer of a model gets under one."""

from __future__ import annotations

import argparse
from pathlib import Path

from kakeyaturbo.commands.common import load_calibration, write_json


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya recipes``."""
    p.add_argument("name", nargs="?",
                   help="print this recipe (a preset, a built-in, a generated kakeya name such as kakeya-3b-head, "
                   "or a JSON file) instead of listing all")
    p.add_argument("--layers", action="store_true",
                   help="instead of the JSON, print the K and V bits each layer gets under the recipe, as built "
                   "from a calibration bundle (for layer_bits \"sensitivity\": where the calibration put the bits)")
    p.add_argument("--model", default="smollm2-135m",
                   help="whose calibration bundle --layers uses (default: %(default)s)")
    p.add_argument("--calibration", type=Path, metavar="DIR",
                   help="calibration bundle for --layers (default: the model's bundle in the cache directory)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --layers: also draw the bits per layer")
    p.add_argument("--json", type=Path, metavar="FILE", help="with --layers: also write them as JSON")


def _layers(args: argparse.Namespace) -> int:
    from kakeyaturbo import recipes
    from kakeyaturbo.engine import build_plans, plan_bits
    from kakeyaturbo.evaluation.plots import layer_bits_plot

    recipe = recipes.load(args.name)
    cal = load_calibration(args.calibration, args.model, None, required=True)
    m = cal.manifest
    bits = plan_bits(build_plans(recipe, m["n_layers"], m["n_kv_heads"], m["head_dim"], cal, m["layer_types"]))
    print(f"{recipe.name} on {m['model']}:")
    print("layer  K bits  V bits   ('-': a codec without a bits setting, e.g. exact storage)")
    for layer, (k, v) in enumerate(bits):
        print(f"{layer:5d}  {'-' if k is None else f'{k:g}':>6s}  {'-' if v is None else f'{v:g}':>6s}")
    coded = [b for pair in bits for b in pair if b is not None]
    if coded:
        print(f"mean over coded streams: {sum(coded) / len(coded):.4f} bits/elem (codes only; the gain byte is "
              "inside the budget, sink tokens and headers are not)")
    write_json(args.json, {"recipe": recipe.name, "model": m["model"], "layer_bits": bits})
    if args.plot:
        title = f"{recipe.name}: bits per layer ({m['model']})"
        print(f"wrote {layer_bits_plot(bits, title, args.plot)}")
    return 0


def run(args: argparse.Namespace) -> int:
    """List, show, or show per layer."""
    from kakeyaturbo import recipes
    from kakeyaturbo.errors import ConfigError
    from kakeyaturbo.recipes.kakeya import PRESETS

    if args.layers or args.plot or args.json:
        if not args.name or not args.layers:
            raise ConfigError("--layers needs a recipe name; --plot and --json need --layers")
        return _layers(args)
    if args.name:
        print(recipes.load(args.name).to_json())
        return 0
    print("Presets (KakeyaConfig; name = generated name of the same config; sweep grids may override its fields):")
    for name, preset in PRESETS.items():
        print(f"  {name:17s} = {preset.config.name:28s} {preset.description.split(' (')[0]}")
    print("Built-in recipes:")
    for name in recipes.names():
        if name not in PRESETS:
            print(f"  {name:32s} {recipes.load(name).description.split('. ')[0][:100]}")
    print("Any generated kakeya name is a recipe too: kakeya-<bits>b[-head][-gain<n>][-refl<n>][-fixed|-entropy]"
          "[-uniform]..., e.g. kakeya-3b-head-uniform (see kakeyaturbo.recipes.kakeya).")
    return 0
