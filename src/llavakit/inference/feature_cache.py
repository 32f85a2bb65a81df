"""A bounded LRU cache of encoded images: the vision tower runs once per distinct image, not once per turn.

In a multi-turn chat every turn re-sends the history's images, and a server sees the same image in many requests
(a shared screenshot, a benchmark image asked several questions). Encoding an image (AnyRes tiles → vision tower →
projector → merged ``[n, D]`` visual tokens) is the most expensive part of a short prompt's prefill, and its result
depends only on the pixels, the tiling decision and the model. So results are kept here, keyed by

    (model key, pixel digest, tiled)

where the pixel digest hashes the *decoded* image (mode, size, raw pixels): the same picture sent as a path, as
PNG bytes or as a data URL shares one entry, and two files with the same name never do. The bound is in bytes of
feature tensors (``n × D × element size``); the least recently used entries are evicted first. One cache may serve
several models (the model key keeps their entries apart) and several threads (a lock guards the table).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from llavakit.errors import ConfigError

DEFAULT_MAX_BYTES = 512 * 1024**2

CacheKey = tuple[str, str, bool]


def image_digest(image: Image.Image) -> str:
    """A content hash of a decoded image: equal for equal pixels, whatever file or encoding they came from."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class CacheStats:
    """Counters since the cache was created (``hits + misses`` = images looked up)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ImageFeatureCache:
    """LRU map from `CacheKey` to an image's visual tokens ``[n, D]``, bounded in bytes.

    Args:
        max_bytes: total size of the cached tensors at most; 0 disables caching (every lookup misses).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ConfigError(f"the image feature cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """Bytes held by the cached tensors now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """The cached features of ``key`` (marked most recently used), or None."""
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return features

    def put(self, key: CacheKey, features: torch.Tensor) -> None:
        """Store a copy of ``features`` under ``key``, evicting least recently used entries to stay in bounds.

        A tensor larger than the whole bound is not stored.
        """
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            # A copy: the features may be a view of a whole batch's projector output, which would stay alive.
            self._entries[key] = features.detach().clone()
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.stats.evictions += 1

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
