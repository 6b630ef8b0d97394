"""A byte store that several processes share: a directory with a byte budget, and a memory tier.

Objects are immutable blobs under hex keys (:func:`~kakeyaturbo.integrations.blocks.prefix_keys`).
Writes are crash-safe (a temp file in the same directory, then an atomic rename), so a reader sees a
whole object or none; a second writer of the same key writes the same bytes. The directory keeps at
most ``budget`` bytes: past it, the least recently used objects (by modification time, refreshed on
every read) are deleted. The memory tier keeps the most recently used objects of this process up to
``memory`` bytes. A blob that turns out damaged is the reader's to reject; :meth:`KVStore.discard`
drops it so it is recomputed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import tempfile
from pathlib import Path

from kakeyaturbo.errors import ConfigError

SUFFIX = ".ktvb"
_KEY = re.compile(r"[0-9a-f]{16,128}")


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{name} must be a number of bytes >= 0 or None, got {value!r}")


class KVStore:
    """Blobs under hex keys in ``directory`` (created if missing).

    Args:
        directory: the shared directory.
        budget: most bytes the directory may hold (None: no limit).
        memory: most bytes this process keeps in memory (0: none).
    """

    def __init__(self, directory: str | Path, budget: int | None = None, memory: int = 0) -> None:
        _check_size("budget", budget)
        _check_size("memory", memory)
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use {self.directory} as a KV store: {exc}") from None
        self.budget = budget
        self.memory = memory
        self._hot: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._hot_bytes = 0

    def path(self, key: str) -> Path:
        """Where ``key`` lives: ``<directory>/<key[:2]>/<key>.ktvb``."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"a store key must be 16-128 lowercase hex digits, got {key!r}")
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def __contains__(self, key: str) -> bool:
        return key in self._hot or self.path(key).is_file()

    def get(self, key: str) -> bytes | None:
        """The blob under ``key``, or None."""
        if key in self._hot:
            self._hot.move_to_end(key)
            return self._hot[key]
        path = self.path(key)
        try:
            blob = path.read_bytes()
            os.utime(path)  # recently used
        except OSError:
            return None
        self._remember(key, blob)
        return blob

    def put(self, key: str, blob: bytes) -> None:
        """Store ``blob`` under ``key`` (atomically), then keep the directory within its budget."""
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._remember(key, blob)
        if self.budget is not None:
            self._evict()

    def discard(self, key: str) -> None:
        """Forget ``key`` (a damaged or foreign blob): from memory and from the directory."""
        self._hot_bytes -= len(self._hot.pop(key, b""))
        with contextlib.suppress(OSError):
            self.path(key).unlink()

    def entries(self) -> list[tuple[str, int, float]]:
        """``(key, bytes, last use)`` of every object in the directory, least recently used first."""
        found = []
        for path in self.directory.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append((path.name.removesuffix(SUFFIX), st.st_size, st.st_mtime))
        return sorted(found, key=lambda e: e[2])

    def _remember(self, key: str, blob: bytes) -> None:
        if len(blob) > self.memory or key in self._hot:
            return
        self._hot[key] = blob
        self._hot_bytes += len(blob)
        while self._hot_bytes > self.memory:
            self._hot_bytes -= len(self._hot.popitem(last=False)[1])

    def _evict(self) -> None:
        entries = self.entries()
        held = sum(size for _, size, _ in entries)
        for key, size, _ in entries:
            if held <= self.budget:
                break
            self.discard(key)
            held -= size
