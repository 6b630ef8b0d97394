"""The calibration bundle: statistics measured once, and the fits made from them on demand.

A bundle directory holds ``manifest.json`` (model, text, split, settings), ``statistics.safetensors``
(:mod:`kakeyaturbo.calibration.statistics`) and ``fits/``: every transform, whitening table or
sensitivity probe a recipe asked for, memoised under a hash of the full config it serves and of the
statistics it was made from (one file each, written to a temporary name and renamed, so several
processes can share a bundle). A second run of the same recipe reads its fits back.

:class:`Calibration` is what the engine uses (:class:`kakeyaturbo.engine.CalibrationLike`); the fits
themselves live in :mod:`kakeyaturbo.calibration.fits` (no model needed) and
:mod:`kakeyaturbo.calibration.probes` (sensitivity probes, which run the model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from tqdm import tqdm

from kakeyaturbo.errors import ConfigError, CorruptDataError

BUNDLE_VERSION = 3
STATISTICS = "statistics.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FIELDS: dict[str, type] = {"model": str, "config_hash": str, "layer_types": list, "settings": dict,
                                    "n_layers": int, "n_kv_heads": int, "head_dim": int}
"""What a bundle's manifest must hold, and of which type (checked when it is loaded)."""
FITS = "fits"


def calibrate_command(model: str, out: Path | None = None) -> str:
    """The command that (re)builds a model's bundle, for error messages."""
    return f"kakeya calibrate --force --model {model}" + (f" --out {out}" if out is not None else "")


def fit_key(kind: str, **fields: Any) -> str:
    """Canonical JSON of what a fit serves (its memo key before hashing)."""
    return json.dumps({"kind": kind, **fields}, sort_keys=True, default=str)


@dataclass
class Calibration:
    """A calibration bundle in memory.

    Attributes:
        manifest: model id and config hash, layer types, text and split, settings, package version.
        statistics: the measured tensors by name (module docstring of
            :mod:`kakeyaturbo.calibration.statistics`).
        directory: where fits are memoised (None: in memory only).
    """

    manifest: dict[str, Any]
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    directory: Path | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    local: dict[str, Any] = field(default_factory=dict, repr=False)
    """Cheap derived values kept in memory only (whitening factors)."""
    _bar: Any = field(default=None, repr=False)

    # --- what the engine uses -----------------------------------------------------------------
    def whitening(self, layer: int, mode: str = "sigma_q") -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, L⁻¹)`` each ``[n_kv, D, D]`` for ``layer``, or None where whitening is unsafe there."""
        from kakeyaturbo.calibration.fits import whitening

        return whitening(self, layer, mode)

    @property
    def skipped_whitening(self) -> dict[int, str]:
        """Layers left unwhitened, with the reason."""
        from kakeyaturbo.calibration.fits import skipped_whitening

        return skipped_whitening(self)

    def table(self, stream: str, bits: int) -> tuple[float, ...]:
        """The Lloyd–Max table of stream ``"k"``/``"v"`` at ``bits`` for the seed's ``kakeya`` codec."""
        from kakeyaturbo.calibration.fits import table

        return table(self, stream, bits)

    def v2_transforms(self, layer: int | tuple[int, ...], stream: str, space: str, layout: str, config: Any) -> Any:
        """The ``kakeya-v2`` transforms serving ``config`` (a ``KakeyaV2Config``) on one (layer, stream)
        in key space ``space`` and engine ``layout`` (``layer`` a tuple: a cross-layer group's)."""
        from kakeyaturbo.calibration.fits import v2_transforms

        return v2_transforms(self, layer, stream, space, layout, config)

    def sensitivity(self, setup: Mapping[str, Any]) -> dict[str, dict[int, dict[float, float]]]:
        """The measured KL of coding each (layer, stream) alone, ``{stream: {layer: {budget: KL}}}``, for
        a probe ``setup`` (:meth:`kakeyaturbo.recipes.Recipe.sensitivity_setup`); it must have been
        measured (:func:`kakeyaturbo.calibration.probes.prepare`, which runs the model)."""
        from kakeyaturbo.calibration.probes import sensitivity_key, stored_sensitivity

        found = self.memo_get(sensitivity_key(self, setup))
        if found is None:
            raise ConfigError(self._needs_model("the sensitivity probe of this recipe's layer budgets"))
        return stored_sensitivity(found)

    @property
    def boundary_ranking(self) -> list[int]:
        """Layers ordered from most to least sensitive to the seed's codec (for ``boundary_top``)."""
        from kakeyaturbo.calibration.probes import boundary_key

        found = self.memo_get(boundary_key(self))
        if found is None:
            raise ConfigError(self._needs_model("the boundary-layer ranking (boundary_top)"))
        return [int(i) for i in found]

    def _needs_model(self, what: str) -> str:
        return (f"the calibration bundle{'' if self.directory is None else f' at {self.directory}'} has not "
                f"measured {what}; it needs the model: run `kakeya calibrate --model {self.model} --recipe NAME`, "
                "or build the cache with kt.compress(model, recipe, calibration) / KakeyaCache.from_model")

    # --- identity -------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """The model id the bundle was measured on."""
        return str(self.manifest.get("model"))

    @property
    def stats_id(self) -> str:
        """Hash of what the statistics were measured from (:func:`statistics_id`)."""
        return statistics_id(self.manifest)

    @property
    def n_layers(self) -> int:
        """Decoder layers the statistics cover (every layer, sliding or full attention)."""
        return len(self.manifest["layer_types"])

    def check_model(self, model_id: str, config_hash: str) -> None:
        """Raise :class:`ConfigError` if the bundle was made for another model or head layout."""
        mine = (self.manifest.get("model"), self.manifest.get("config_hash"))
        if mine[1] != config_hash:
            raise ConfigError(
                f"calibration bundle was made for model {mine[0]!r} (config {mine[1]}), not for {model_id!r} "
                f"(config {config_hash}); run `kakeya calibrate --model {model_id}` (its bundle is then found "
                f"by default) or pass that model's bundle with --calibration DIR"
            )

    def stat(self, name: str) -> torch.Tensor:
        """One statistics tensor by name; :class:`CorruptDataError` if the bundle lacks it."""
        if name not in self.statistics:
            raise CorruptDataError(f"calibration statistics lack {name!r}; rebuild the bundle with "
                                   f"`{calibrate_command(self.model, self.directory)}`")
        return self.statistics[name]

    # --- memoised fits ----------------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        kind = json.loads(key)["kind"]
        return self.directory / FITS / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"

    def memo_get(self, key: str) -> Any:
        """The memoised value of ``key`` (tensors dict or JSON value), from memory or the bundle's
        ``fits/``, or None; an unreadable or mismatching file counts as missing."""
        if key in self._memo:
            return self._memo[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load(path.read_bytes())
            meta = json.loads(tensors.pop("__meta__").numpy().tobytes().decode()) if "__meta__" in tensors else None
        except (ValueError, OSError, RuntimeError, SafetensorError, UnicodeDecodeError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        value = meta.get("value", tensors)
        self._memo[key] = value
        return value

    def memo_put(self, key: str, value: Any) -> Any:
        """Memoise ``value`` (a dict of tensors, or a JSON value) under ``key``; returns it."""
        self._memo[key] = value
        path = self._path(key)
        if path is None:
            return value
        tensors = dict(value) if isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values()) \
            else {}
        meta = {"key": key} if tensors else {"key": key, "value": value}
        blob = json.dumps(meta).encode()
        tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        tensors["__meta__"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return value

    def memoised(self, key: str, make: Callable[[], Any], what: str) -> Any:
        """``memo_get(key)``, else ``make()`` memoised (:meth:`made`)."""
        found = self.memo_get(key)
        return found if found is not None else self.made(key, make(), what)

    def made(self, key: str, value: Any, what: str) -> Any:
        """Memoise ``value``, just made, under ``key`` (:meth:`memo_put`), counted on the open :meth:`fitting`
        bar as ``what``; returns it."""
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update()
        return self.memo_put(key, value)

    @contextlib.contextmanager
    def fitting(self, desc: str) -> Iterator[None]:
        """Within this block, fits made on demand are shown on a progress bar labelled ``desc``."""
        if self._bar is not None:
            yield
            return
        self._bar = tqdm(desc=desc, unit="fit", delay=0.5)
        try:
            yield
        finally:
            if self._bar.n:
                where = f" (memoised in {self.directory / FITS})" if self.directory is not None else ""
                self._bar.set_postfix_str(f"done{where}", refresh=True)
            self._bar.close()
            self._bar = None

    # --- files -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` and ``statistics.safetensors`` into ``directory`` (and memoise fits
        there from now on; fits made before are written too)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.statistics.items()}, str(out / STATISTICS))
        manifest = {**self.manifest, "bundle_version": BUNDLE_VERSION}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        self.directory = out
        for key, value in list(self._memo.items()):
            self.memo_put(key, value)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Calibration:
        """Read a bundle written by :meth:`save`.

        Raises:
            ConfigError: the directory or a file is missing, or it is a bundle of an older version
                (the message names the command that rebuilds it).
            CorruptDataError: unreadable manifest or statistics.
        """
        d = Path(directory)
        manifest = read_manifest(d)
        if not (d / STATISTICS).is_file():
            raise ConfigError(_not_a_bundle(d))
        try:
            statistics = load_file(str(d / STATISTICS))
        except (ValueError, OSError, RuntimeError, SafetensorError) as exc:
            raise CorruptDataError(f"calibration bundle {d} is unreadable: {exc}") from None
        return cls(manifest, statistics, d)


def _not_a_bundle(d: Path) -> str:
    return (f"{d} is not a calibration bundle (needs {MANIFEST} and {STATISTICS}); create one with "
            "`kakeya calibrate --out DIR`")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of the bundle in ``directory``, without reading its statistics.

    Raises:
        ConfigError: no manifest, or a bundle of an older version (the message names the command
            that rebuilds it).
        CorruptDataError: an unreadable manifest or one with fields of the wrong type.
    """
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise ConfigError(_not_a_bundle(d))
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (ValueError, OSError) as exc:
        raise CorruptDataError(f"calibration bundle {d} is unreadable: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptDataError(f"calibration bundle {d}: manifest.json is not a JSON object")
    version = manifest.get("bundle_version")
    if version != BUNDLE_VERSION:
        model = manifest.get("model", "MODEL")
        raise ConfigError(f"calibration bundle {d} is version {version}, this KakeyaTurbo reads version "
                          f"{BUNDLE_VERSION} (statistics, with transforms fitted on demand); rebuild it with "
                          f"`{calibrate_command(model, d)}`")
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            wanted = "a positive integer" if kind is int else f"a {kind.__name__}"
            raise CorruptDataError(f"calibration bundle {d}: manifest {key!r} must be {wanted}, got {value!r}")
    if len(manifest["layer_types"]) != manifest["n_layers"] or not all(
            isinstance(t, str) for t in manifest["layer_types"]):
        raise CorruptDataError(f"calibration bundle {d}: manifest 'layer_types' must be n_layers strings")
    return manifest


def statistics_id(manifest: Mapping[str, Any]) -> str:
    """Hash of what a bundle's statistics were measured from (model config, text, split, settings)."""
    keys = ("config_hash", "text", "split", "settings", "layer_types", "dtype")
    blob = json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(config: Any) -> str:
    """Hash of the attention-relevant model config (layers, heads, head dim, RoPE)."""
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "rope_theta", "rope_parameters", "rope_scaling", "layer_types", "vocab_size")
    blob = json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_bundle_dir(model_name: str) -> Path:
    """Where ``kakeya calibrate`` puts a model's bundle by default (inside the cache directory)."""
    from kakeyaturbo.models.loading import cache_dir

    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return cache_dir() / "calibration" / slug
