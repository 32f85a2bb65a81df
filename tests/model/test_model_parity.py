"""Parity with transformers' LlavaNextForConditionalGeneration, an implementation nobody here wrote.

Our model runs on our own preprocessing (anyres.pixels + anyres.geometry token counts); transformers runs on its own
processor saved in our checkpoint. Logits must agree to 1e-4 in fp32 for every grid, aspect ratio and batch mix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llavakit.anyres.geometry import count_visual_tokens, select_best_resolution
from llavakit.anyres.pixels import process_image
from llavakit.model.llava_next import LlavaNextModel

# The tiny debug presets: the real-shape ones (qwen2.5-0.5b-siglip-shapes, ...) are for GPU tests and benchmarks.
PRESET_NAMES = ("debug-clip-llama", "debug-siglip-qwen2")

# (height, width): tiny, very large, portrait, landscape, square, plus one per grid of each preset's pinpoints.
BASE_SIZES = [(7, 10), (1200, 3000), (90, 28), (28, 90), (70, 70), (20, 45), (45, 20), (33, 33), (200, 50)]


def _random_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _expand(tokenizer, text: str, counts: list[int], image_token_id: int) -> list[int]:
    ids = tokenizer(text).input_ids
    out, images = [], iter(counts)
    for token in ids:
        out.extend([image_token_id] * next(images) if token == image_token_id else [token])
    return out


def _our_batch(model: LlavaNextModel, texts: list[str], images: list[list[Image.Image]]) -> dict:
    spec, tokenizer = model.config.image_spec, model.tokenizer
    rows, tiles, sizes = [], [], []
    for text, sample_images in zip(texts, images):
        counts = [count_visual_tokens((im.height, im.width), spec) for im in sample_images]
        rows.append(_expand(tokenizer, text, counts, model.config.image_token_id))
        tiles += [process_image(im, spec) for im in sample_images]
        sizes += [(im.height, im.width) for im in sample_images]
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "pixel_values": torch.cat(tiles) if tiles else None,
        "image_sizes": torch.tensor(sizes) if sizes else None,
    }


@pytest.fixture(params=PRESET_NAMES)
def saved(request, preset_model, tmp_path):
    model = preset_model(request.param)
    path = model.save_pretrained(tmp_path / "ckpt")
    reference, info = LlavaNextForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, reference.eval(), AutoProcessor.from_pretrained(path), path


def test_every_grid_is_covered():
    """The size list must exercise every pinpoint of both presets, or the parity test proves less than it claims."""
    from llavakit.model.presets import PRESETS

    for name in PRESET_NAMES:
        spec = PRESETS.get(name).image_spec()
        chosen = {select_best_resolution(size, spec.pinpoints) for size in BASE_SIZES + _grid_sizes(spec)}
        assert chosen == set(spec.pinpoints), name


def _grid_sizes(spec) -> list[tuple[int, int]]:
    """One image per pinpoint: the pinpoint itself, shrunk a little, picks that pinpoint."""
    return [(h - 3, w - 3) for h, w in spec.pinpoints]


@pytest.mark.parametrize("index", range(len(BASE_SIZES)))
def test_single_image_logits_match_transformers(saved, index):
    model, reference, processor, _ = saved
    image = _random_image(BASE_SIZES[index], seed=index)
    _assert_same_logits(model, reference, processor, ["<image>\nWhat is this?"], [[image]])


def test_each_grid_matches_transformers(saved):
    model, reference, processor, _ = saved
    for seed, size in enumerate(_grid_sizes(model.config.image_spec)):
        _assert_same_logits(model, reference, processor, ["Look: <image>"], [[_random_image(size, seed)]])


def test_mixed_batch_text_only_and_multi_image(saved):
    model, reference, processor, _ = saved
    texts = ["first <image> then <image> compare them", "a text-only sample without any picture at all", "<image> one"]
    images = [[_random_image((40, 90), 1), _random_image((100, 30), 2)], [], [_random_image((64, 64), 3)]]
    _assert_same_logits(model, reference, processor, texts, images)


def _assert_same_logits(model, reference, processor, texts, images):
    ours = _our_batch(model, texts, images)
    flat_images = [im for sample in images for im in sample]
    theirs = processor(text=texts, images=flat_images or None, return_tensors="pt", padding=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"]), "visual-token counts differ from the processor's"
    with torch.no_grad():
        our_logits = model(**ours).logits
        their_logits = reference(**theirs).logits
    mask = ours["attention_mask"].bool()
    assert (our_logits[mask] - their_logits[mask]).abs().max().item() <= 1e-4


def test_transformers_checkpoint_loads_in_llavakit(saved, tmp_path):
    model, reference, processor, _ = saved
    reference.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    loaded = LlavaNextModel.from_pretrained(tmp_path / "hf")
    image = _random_image((50, 120), 7)
    batch = _our_batch(model, ["<image> hi"], [[image]])
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-5)


def test_llavakit_round_trip_is_exact(saved):
    model, _, _, path = saved
    loaded = LlavaNextModel.from_pretrained(path)
    batch = _our_batch(model, ["<image> describe"], [[_random_image((30, 80), 4)]])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded.config.image_spec == model.config.image_spec
    assert loaded.config.template == model.config.template
