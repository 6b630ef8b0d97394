"""A vLLM KV connector that stores each prompt's K/V compressed by a recipe and loads it back.

Start vLLM with it (offline ``LLM`` or ``vllm serve --kv-transfer-config '{...}'``)::

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=MODEL_DIR, kv_transfer_config=KVTransferConfig(
        kv_connector="KakeyaConnector", kv_role="kv_both",
        kv_connector_module_path="kakeyaturbo.integrations.vllm",
        kv_connector_extra_config={"store": "/var/cache/kakeya-kv", "recipe": "kakeya-balanced"}))

``kv_connector_extra_config``: ``store`` (directory, shared by every engine process; required),
``recipe`` (a name or recipe file; default ``kakeya-balanced``), ``calibration`` (the model's bundle
directory; default: the one ``kakeya calibrate --model MODEL_DIR`` writes; needed by calibrated
recipes, whose fits and probes are made on first use), ``store_bytes`` (the directory's byte budget,
least recently used blocks evicted; default: no limit) and ``memory_bytes`` (an in-process tier;
default 256 MB).

How it works: every full block of a prompt (vLLM's ``block_size`` tokens) is coded once it has been
computed (:class:`~kakeyaturbo.integrations.blocks.BlockCodec`: keys inverted to pre-RoPE at their
positions where the recipe says so) and written under a key that chains its tokens onto the
prompt's earlier blocks and onto the model, recipe and calibration
(:func:`~kakeyaturbo.integrations.blocks.prefix_keys`). A later request — in this engine or another
process using the same directory — whose prompt starts with stored blocks gets them decoded into its
paged KV cache, and vLLM skips their prefill. A block that is damaged, truncated or coded for
another model is a miss (checked on lookup; a failure at load time is reported through
``get_block_ids_with_load_errors``, so start vLLM with ``kv_load_failure_policy="recompute"``).

Supported here: vLLM's CPU attention backend (paged cache ``[blocks, n_kv, block_size, 2·D]``, whose
inside depends on the attention ISA: the connector learns it at start-up from vLLM's own
cache-writing kernel, and the tests check the stored K/V against transformers' own), models without
sliding-window layers. Other layouts raise
:class:`~kakeyaturbo.errors.ConfigError` naming what was found.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kakeyaturbo.calibration.bundle import Calibration, config_hash, default_bundle_dir, read_manifest, statistics_id
from kakeyaturbo.errors import ConfigError, CorruptDataError, KakeyaError
from kakeyaturbo.integrations.blocks import (
    BlockCodec,
    check_block,
    identity_for,
    prefix_keys,
    read_header,
    serving_recipe,
)
from kakeyaturbo.integrations.store import KVStore
from kakeyaturbo.models.arch import SLIDING, facts

log = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handlers print it
DEFAULT_RECIPE = "kakeya-balanced"
DEFAULT_MEMORY = 256 * 2**20


@dataclasses.dataclass
class KakeyaMeta(KVConnectorMetadata):
    """What the worker does this step: ``loads`` and ``saves``, each ``(key, block_id, start)``
    (vLLM's physical block id, the block's first position)."""

    loads: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    saves: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Prompt:
    """Scheduler-side state of one request: its block keys, block ids and blocks already stored."""

    keys: list[str]
    block_ids: list[int]
    stored: int


def _layer_index(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    if found is None:
        raise ConfigError(f"cannot tell the layer index of vLLM attention layer {name!r}")
    return int(found.group(1))


def _block_layout(dtype: torch.dtype, heads: int, block: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one paged block keeps each K and V value: flat offsets ``[heads, block, dim]`` for K and
    for V, learnt by writing known values with vLLM's own cache-writing kernel (the layout depends on
    the attention ISA vLLM picks for the dtype and CPU: transposed keys for its vector kernels, packed
    pairs for AMX bf16, ...). Values stay below 256, which every cache dtype holds exactly."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block, dim)
    scratch = torch.zeros(1, heads, block, 2 * dim, dtype=dtype)
    key_cache, value_cache = scratch.view(1, heads, 2 * block, dim).chunk(2, dim=2)
    grids = torch.meshgrid(torch.arange(block), torch.arange(heads), torch.arange(dim), indexing="ij")
    zeros = torch.zeros(block, heads, dim, dtype=dtype)

    def written(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scratch.zero_()
        ops.cpu_attn_reshape_and_cache(k.to(dtype), v.to(dtype), key_cache, value_cache, torch.arange(block), isa)
        return scratch.view(-1).float().clone()

    index = []
    for stream in (0, 1):
        def put(x: torch.Tensor, stream: int = stream) -> torch.Tensor:
            return written(x, zeros) if stream == 0 else written(zeros, x)

        where = put(torch.ones(block, heads, dim)).nonzero().squeeze(1)
        t, h, d = (put(g.float())[where].long() for g in grids)
        out = torch.full((heads, block, dim), -1, dtype=torch.long)
        out[h, t, d] = where
        if where.numel() != heads * block * dim or bool((out < 0).any()):
            raise ConfigError(f"KakeyaConnector: cannot map vLLM's paged {'KV'[stream]} layout (ISA {isa!r})")
        index.append(out)
    return index[0], index[1]


class KakeyaConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by a :class:`~kakeyaturbo.integrations.store.KVStore` of recipe-coded
    blocks (module docstring)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from kakeyaturbo import recipes

        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        unknown = set(extra) - {"store", "recipe", "calibration", "store_bytes", "memory_bytes"}
        if unknown or "store" not in extra:
            raise ConfigError(f"KakeyaConnector: kv_connector_extra_config needs 'store' (a directory) and takes "
                              f"'recipe', 'calibration', 'store_bytes', 'memory_bytes'; got {sorted(extra)}")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.model_name = str(vllm_config.model_config.model)
        self.hf_config = vllm_config.model_config.hf_config
        self.recipe = recipes.load(extra.get("recipe", DEFAULT_RECIPE))
        self.store = KVStore(extra["store"], extra.get("store_bytes"), int(extra.get("memory_bytes", DEFAULT_MEMORY)))
        self.n_layers = facts(self.hf_config).n_layers
        bundle = self._bundle_dir(extra.get("calibration"))
        # the scheduler keys blocks by the bundle's statistics id (its manifest); the worker codes with it
        self.calibration = None
        if bundle is not None and role == KVConnectorRole.WORKER:
            self.calibration = Calibration.load(bundle)
            self.calibration.check_model(self.model_name, config_hash(self.hf_config))
        stats = "" if bundle is None else statistics_id(read_manifest(bundle))
        self.identity = identity_for(self.model_name, self.hf_config, self.recipe, self.block_size, stats)
        self.stats = {"looked_up": 0, "hit_tokens": 0, "misses": 0, "loaded_blocks": 0, "saved_blocks": 0,
                      "load_errors": 0}
        # scheduler side
        self._prompts: dict[str, _Prompt] = {}
        self._matched: dict[str, tuple[int, int]] = {}
        self._to_load: dict[str, tuple[int, int]] = {}
        # worker side
        self.codec: BlockCodec | None = None
        self._kv: dict[int, torch.Tensor] = {}
        self._saving: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._errors: set[int] = set()
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        if role == KVConnectorRole.WORKER:
            self.codec = self._codec()

    # --- set-up ---------------------------------------------------------------------------------
    def _bundle_dir(self, directory: str | None) -> Path | None:
        """The calibration bundle the recipe needs (``directory``, else the model's default), or None."""
        if not self.recipe.needs_calibration:
            return None
        from kakeyaturbo.models.loading import DEFAULT_MODEL, cache_dir

        packaged = Path(self.model_name).resolve() == (cache_dir() / "models" / DEFAULT_MODEL).resolve()
        return Path(directory) if directory else default_bundle_dir(DEFAULT_MODEL if packaged else self.model_name)

    def _codec(self) -> BlockCodec:
        if SLIDING in facts(self.hf_config).layer_types:
            raise ConfigError(f"KakeyaConnector: {self.model_name} has sliding-window layers, which this connector "
                              "does not serve yet")
        recipe = serving_recipe(self.recipe, self.block_size)
        if self.calibration is not None:
            self._prepare(recipe)
        return BlockCodec.for_recipe(recipe, self.hf_config, self.block_size, self.identity, self.calibration)

    def _prepare(self, recipe: Any) -> None:
        """Fits and probes the recipe needs; the model (loaded here, on CPU) only if a probe must run."""
        from kakeyaturbo.calibration import prepare
        from kakeyaturbo.calibration.probes import pending_probes, prefit

        if pending_probes(recipe, self.calibration):
            from kakeyaturbo.models.loading import load_model

            prepare(recipe, self.calibration, load_model(self.model_name, dtype=torch.bfloat16)[0])
        else:
            prefit(self.calibration, [recipe], facts(self.hf_config))

    # --- scheduler side -------------------------------------------------------------------------
    def _valid(self, key: str, start: int) -> bool:
        blob = self.store.get(key)
        if blob is None:
            return False
        try:
            check_block(read_header(blob)[0], self.identity, start, self.block_size, self.n_layers)
        except CorruptDataError as exc:
            log.warning("KakeyaConnector: store miss, %s", exc)
            self.stats["misses"] += 1
            self.store.discard(key)
            return False
        return True

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` whose blocks the store holds (whole blocks of the
        prompt, its last token excluded: vLLM computes at least one)."""
        tokens = list(request.prompt_token_ids or [])
        keys = prefix_keys(tokens[: max(len(tokens) - 1, 0)], self.block_size, self.identity)
        self.stats["looked_up"] += 1
        found = num_computed_tokens // self.block_size
        while found < len(keys) and self._valid(keys[found], found * self.block_size):
            found += 1
        hit = found * self.block_size - num_computed_tokens
        self._matched[request.request_id] = (num_computed_tokens // self.block_size, found)
        return max(hit, 0), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Remember what to load into the blocks vLLM allocated."""
        first, last = self._matched.pop(request.request_id, (0, 0))
        if num_external_tokens > 0:
            self._to_load[request.request_id] = (first, last)
            self.stats["hit_tokens"] += num_external_tokens

    def build_connector_meta(self, scheduler_output: Any) -> KakeyaMeta:
        """Loads for requests with stored blocks, saves for prompt blocks computed by this step."""
        meta = KakeyaMeta()
        scheduled = scheduler_output.num_scheduled_tokens
        for req in scheduler_output.scheduled_new_reqs:
            tokens = list(req.prompt_token_ids or [])
            state = _Prompt(prefix_keys(tokens, self.block_size, self.identity), list(req.block_ids[0]), 0)
            first, last = self._to_load.pop(req.req_id, (0, 0))
            meta.loads += [(state.keys[j], state.block_ids[j], j * self.block_size) for j in range(first, last)]
            state.stored = last
            self._prompts[req.req_id] = state
            self._saves(meta, state, req.num_computed_tokens + scheduled[req.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._prompts.get(req_id)
            if state is None:
                continue
            if cached.new_block_ids[i] is not None:
                state.block_ids += list(cached.new_block_ids[i][0])
            self._saves(meta, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _saves(self, meta: KakeyaMeta, state: _Prompt, computed: int) -> None:
        done = min(computed // self.block_size, len(state.keys), len(state.block_ids))
        for j in range(state.stored, done):
            if state.keys[j] not in self.store:
                meta.saves.append((state.keys[j], state.block_ids[j], j * self.block_size))
        state.stored = max(state.stored, done)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request (its blocks were stored as they were computed)."""
        self._prompts.pop(request.request_id, None)
        return False, None

    # --- worker side ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep vLLM's paged K/V per layer index, after learning where a block keeps each value."""
        p = self.codec.plans[0]
        for name, kv in kv_caches.items():
            want = (p.n_kv_heads, self.block_size, 2 * p.head_dim)
            if kv.dim() != 4 or tuple(kv.shape[1:]) != want:
                raise ConfigError(f"KakeyaConnector serves vLLM's CPU paged layout [blocks, {want[0]}, {want[1]}, "
                                  f"{want[2]}]; layer {name} has {tuple(kv.shape)}")
            self._kv[_layer_index(name)] = kv
        if sorted(self._kv) != list(range(len(self.codec.plans))):
            raise ConfigError(f"KakeyaConnector: vLLM registered layers {sorted(self._kv)}, the model has "
                              f"{len(self.codec.plans)}")
        self._index = _block_layout(self._kv[0].dtype, p.n_kv_heads, self.block_size, p.head_dim)

    def _block(self, layer: int, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies ``(k, v)`` ``[n_kv, block_size, D]`` of one physical block of one layer."""
        flat = self._kv[layer][block_id].view(-1)
        return flat[self._index[0]], flat[self._index[1]]

    def _write(self, layer: int, block_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put ``k``, ``v`` ``[n_kv, block_size, D]`` into one physical block of one layer."""
        flat = self._kv[layer][block_id].view(-1)
        flat[self._index[0]] = k.to(flat.dtype)
        flat[self._index[1]] = v.to(flat.dtype)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Decode this step's stored blocks into the paged cache (a damaged one: a load error)."""
        meta = self._get_connector_metadata()
        blobs = [self.store.get(key) for key, _, _ in meta.loads]
        found = [(blob, start) for blob, (_, _, start) in zip(blobs, meta.loads) if blob is not None]
        decoded = iter(self.codec.decode_many(found))  # all of this step's blocks in one call per layer
        for blob, (key, block_id, _) in zip(blobs, meta.loads):
            result = next(decoded) if blob is not None else CorruptDataError(f"block {key[:12]} left the store")
            if isinstance(result, CorruptDataError):
                log.warning("KakeyaConnector: load error, %s", result)
                self.store.discard(key)
                self._errors.add(block_id)
                self.stats["load_errors"] += 1
                continue
            k, v = result
            for layer in range(len(self.codec.plans)):
                self._write(layer, block_id, k[layer], v[layer])
            self.stats["loaded_blocks"] += 1

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are synchronous (done in :meth:`start_load_kv`)."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Copy this layer's K/V of the blocks to store out of the paged cache."""
        meta = self._get_connector_metadata()
        layer = _layer_index(layer_name)
        for key, block_id, _ in meta.saves:
            self._saving.setdefault(key, {})[layer] = self._block(layer, block_id)

    def wait_for_save(self) -> None:
        """Code and store every block whose layers have all been copied."""
        meta = self._get_connector_metadata()
        n = len(self.codec.plans)
        for key, _, start in meta.saves:
            layers = self._saving.pop(key, {})
            if len(layers) != n:
                continue
            k = torch.stack([layers[i][0] for i in range(n)])
            v = torch.stack([layers[i][1] for i in range(n)])
            try:
                self.store.put(key, self.codec.encode(k, v, start))
            except (KakeyaError, OSError) as exc:  # a block not stored is a later miss, not a failed request
                log.warning("KakeyaConnector: block at %d not stored: %s", start, exc)
                continue
            self.stats["saved_blocks"] += 1

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose stored K/V could not be loaded this step (vLLM recomputes them)."""
        errors, self._errors = self._errors, set()
        return errors

    def shutdown(self) -> None:
        """Log the counters."""
        log.info("KakeyaConnector (%s): %s", self._role, self.stats)
