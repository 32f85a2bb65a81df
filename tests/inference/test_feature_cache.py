"""The image-feature cache: bounded LRU by bytes, keyed by pixels (not file names), and a multi-turn chat runs the
vision tower once for its image while answering exactly as without the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import llavakit
from llavakit.errors import ConfigError
from llavakit.inference.feature_cache import ImageFeatureCache, image_digest


def tensor(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 4)  # 16 bytes per row


def test_lru_eviction_keeps_the_byte_bound():
    cache = ImageFeatureCache(max_bytes=16 * 10)
    cache.put(("m", "a", True), tensor(4))
    cache.put(("m", "b", True), tensor(4))
    assert cache.get(("m", "a", True)) is not None  # "a" is now the most recently used
    cache.put(("m", "c", True), tensor(4))  # over the bound: "b" goes
    assert cache.get(("m", "b", True)) is None
    assert cache.get(("m", "a", True)) is not None and cache.get(("m", "c", True)) is not None
    assert cache.size_bytes == 16 * 8 <= cache.max_bytes
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (3, 1, 1)
    cache.put(("m", "huge", True), tensor(11))  # larger than the whole bound: not stored, nothing evicted
    assert len(cache) == 2
    with pytest.raises(ConfigError, match=">= 0"):
        ImageFeatureCache(-1)


def test_digest_follows_pixels_not_files(tmp_path: Path):
    image = Image.new("RGB", (8, 6), "red")
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "b.bmp")
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.bmp") as b:
        assert image_digest(a.convert("RGB")) == image_digest(b.convert("RGB"))
    other = image.copy()
    other.putpixel((0, 0), (254, 0, 0))
    assert image_digest(other) != image_digest(image)


class TowerCalls:
    """Counts forward calls of a model's vision tower."""

    def __init__(self, model):
        self.count = 0
        model.vision_encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "scene.png"
    Image.new("RGB", (48, 30), "blue").save(path)
    return str(path)


def test_chat_encodes_its_image_once_and_answers_as_without_cache(checkpoint, picture):
    cached = llavakit.load(checkpoint, device="cpu")
    uncached = llavakit.load(checkpoint, device="cpu", feature_cache=ImageFeatureCache(0))
    calls = {"cached": TowerCalls(cached.model), "uncached": TowerCalls(uncached.model)}
    histories = {"cached": None, "uncached": None}
    for turn, question in enumerate(["What is it?", "What colour?", "How many?"]):
        image = picture if turn == 0 else None
        answers = {}
        for name, assistant in (("cached", cached), ("uncached", uncached)):
            answers[name], histories[name] = assistant.chat(
                image, question, history=histories[name], max_new_tokens=5
            )
        assert answers["cached"] == answers["uncached"]
    assert calls["cached"].count == 1
    assert calls["uncached"].count == 3
    Path(picture).with_name("copy.png").write_bytes(Path(picture).read_bytes())
    cached.chat(str(Path(picture).with_name("copy.png")), "Same picture?", max_new_tokens=2)
    assert calls["cached"].count == 1  # same pixels under another name: still cached
