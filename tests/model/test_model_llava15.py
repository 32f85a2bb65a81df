"""LLaVA-1.5 in the llava-hf layout: parity with transformers' LlavaForConditionalGeneration, both ways.

A LLaVA-1.5-style model (one ``pad`` or ``square`` tile per image, ``flat`` merge, no ``image_newline``) is saved
with ``model_type: llava`` and a ``LlavaProcessor``; transformers, an implementation nobody here wrote, must then
produce the same logits from its own processor as llavakit from its own preprocessing, on images of many aspect
ratios (the padding to a square is where they could differ). The other way round, a checkpoint transformers builds
and saves itself, with no ``llavakit`` section, loads in llavakit with the preprocessing its image processor config
names and the same logits. The shipped ``llava-1.5-vicuna-7b`` recipe exports in this layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import process_image
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import CheckpointError
from llavakit.model.config import LlavaKitConfig
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config_loading import config_from_dict
from llavakit.training.recipes import recipe_dict
from llavakit.training.trainer import train

# (height, width): tiny, very wide, portrait, landscape, square, odd differences (the pad offset rounds), huge.
SIZES = [(7, 10), (90, 28), (28, 90), (70, 70), (5, 64), (45, 20), (31, 50), (1200, 3000)]
TOLERANCE = 1e-4  # fp32, as for llava_next (tests/model/test_model_parity.py)


def _random_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _llava15_model(preset_parts, preset: str, aspect_ratio: str) -> LlavaNextModel:
    kwargs = preset_parts(preset).from_parts_kwargs()
    spec = kwargs["image_spec"].to_dict()
    kwargs["image_spec"] = ImageSpec(**{**spec, "aspect_ratio": aspect_ratio, "merge_type": "flat"})
    torch.manual_seed(0)
    return LlavaNextModel.from_parts(**kwargs).eval()


def _our_batch(model: LlavaNextModel, texts: list[str], images: list[list[Image.Image]]) -> dict:
    """Our preprocessing: `process_image` tiles and `count_visual_tokens` placeholders, right-padded."""
    spec, tokenizer, image_id = model.config.image_spec, model.tokenizer, model.config.image_token_id
    rows, tiles, sizes = [], [], []
    for text, sample_images in zip(texts, images):
        counts = iter([count_visual_tokens((im.height, im.width), spec) for im in sample_images])
        ids = tokenizer(text).input_ids
        rows.append(
            [t for token in ids for t in ([image_id] * next(counts) if token == image_id else [token])]
        )
        tiles += [process_image(im, spec) for im in sample_images]
        sizes += [(im.height, im.width) for im in sample_images]
    length, pad = max(map(len, rows)), tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "pixel_values": torch.cat(tiles) if tiles else None,
        "image_sizes": torch.tensor(sizes) if sizes else None,
    }


def _assert_same_logits(model, reference, processor, texts, images) -> None:
    ours = _our_batch(model, texts, images)
    flat_images = [im for sample in images for im in sample]
    theirs = processor(text=texts, images=flat_images or None, return_tensors="pt", padding=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"]), (
        "visual-token counts differ from the processor's"
    )
    with torch.no_grad():
        our_logits = model(**ours).logits
        their_logits = reference(
            input_ids=theirs["input_ids"],
            attention_mask=theirs["attention_mask"],
            pixel_values=theirs.get("pixel_values"),
        ).logits
    mask = ours["attention_mask"].bool()
    assert (our_logits[mask] - their_logits[mask]).abs().max().item() <= TOLERANCE


@pytest.fixture(
    params=[("debug-clip-llama", "pad"), ("debug-clip-llama", "square"), ("debug-siglip-qwen2", "pad")],
    ids=lambda p: "-".join(p),
)
def saved(request, preset_parts, tmp_path):
    model = _llava15_model(preset_parts, *request.param)
    path = model.save_pretrained(tmp_path / "ckpt")
    reference, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, reference.eval(), AutoProcessor.from_pretrained(path), path


def test_saved_as_transformers_llava(saved):
    model, _, processor, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert "image_grid_pinpoints" not in config and "image_newline" not in dict(model.named_parameters())
    assert isinstance(processor, LlavaProcessor)
    assert processor.image_processor.do_pad == (model.config.image_spec.aspect_ratio == "pad")


def test_single_images_of_every_aspect_ratio_match_transformers(saved):
    model, reference, processor, _ = saved
    for seed, size in enumerate(SIZES):
        _assert_same_logits(
            model, reference, processor, ["<image>\nWhat is this?"], [[_random_image(size, seed)]]
        )


def test_mixed_batch_text_only_and_multi_image(saved):
    model, reference, processor, _ = saved
    texts = [
        "first <image> then <image> compare them",
        "a text-only sample without any picture at all",
        "<image> one",
    ]
    images = [[_random_image((40, 90), 1), _random_image((100, 30), 2)], [], [_random_image((64, 64), 3)]]
    _assert_same_logits(model, reference, processor, texts, images)


def test_llavakit_round_trip_is_exact(saved):
    model, _, _, path = saved
    loaded = LlavaNextModel.from_pretrained(path)
    assert loaded.config.image_spec == model.config.image_spec and loaded.image_newline is None
    batch = _our_batch(model, ["<image> describe"], [[_random_image((30, 80), 4)]])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def _transformers_checkpoint(saved, tmp_path, image_processor, nested: bool):
    """A llava-hf ``llava`` folder transformers builds and writes itself: its own random weights, no ``llavakit``
    section; the image processor config nested in ``processor_config.json`` (transformers 5) or alone in
    ``preprocessor_config.json`` (llava-hf repositories)."""
    model, _, processor, path = saved
    data = json.loads((path / "config.json").read_text())
    fields = (
        "image_token_index",
        "vision_feature_select_strategy",
        "vision_feature_layer",
        "image_seq_length",
    )
    config = LlavaConfig(
        vision_config=data["vision_config"], text_config=data["text_config"], **{k: data[k] for k in fields}
    )
    torch.manual_seed(1)
    reference = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path / "hf"
    reference.save_pretrained(folder)
    theirs = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )
    if nested:
        theirs.save_pretrained(folder)
    else:
        image_processor.save_pretrained(folder)
        processor.tokenizer.save_pretrained(folder)
    assert "llavakit" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llava"
    return reference, theirs, folder


@pytest.mark.parametrize("layout", ["llava-hf-clip-processor", "transformers-padding-processor"])
def test_transformers_checkpoint_loads_in_llavakit(saved, tmp_path, layout):
    """llava-hf's own CLIPImageProcessor (no padding) means ``square``; LlavaImageProcessor ``do_pad`` ``pad``."""
    model, _, processor, _ = saved
    spec = model.config.image_spec
    sizes = {
        "size": {"shortest_edge": spec.tile_size},
        "crop_size": {"height": spec.tile_size, "width": spec.tile_size},
    }
    normalise = {"image_mean": list(spec.image_mean), "image_std": list(spec.image_std)}
    if layout == "llava-hf-clip-processor":
        image_processor, expected, nested = CLIPImageProcessor(**sizes, **normalise), "square", False
    else:
        image_processor, expected, nested = (
            type(processor.image_processor)(**sizes, **normalise, do_pad=True),
            "pad",
            True,
        )
    reference, their_processor, folder = _transformers_checkpoint(saved, tmp_path, image_processor, nested)
    loaded = LlavaNextModel.from_pretrained(folder)
    assert loaded.config.image_spec.aspect_ratio == expected and loaded.config.image_spec.merge_type == "flat"
    assert loaded.image_newline is None
    texts = ["<image> hi", "look <image> and <image>"]
    images = [[_random_image((50, 120), 7)], [_random_image((90, 33), 8), _random_image((21, 21), 9)]]
    _assert_same_logits(loaded, reference, their_processor, texts, images)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic LLaVA dataset (tests/training/conftest.py's fixture is out of this folder's reach)."""
    from llavakit.data.synth import SynthConfig, generate_synth

    return generate_synth(tmp_path_factory.mktemp("synth"), SynthConfig(n_train=8, n_heldout=1))


def test_llava15_recipe_exports_a_transformers_llava_checkpoint(tmp_path, synth):
    """One step of each stage of the shipped recipe, its image spec kept (tile and patch size the debug model's)."""
    data = recipe_dict("llava-1.5-vicuna-7b")
    image_spec = {
        k: v for k, v in data["model"]["image_spec"].items() if k not in ("tile_size", "patch_size")
    }
    assert image_spec == {"aspect_ratio": "pad", "merge_type": "flat"}
    data["run_dir"] = str(tmp_path / "run")
    data["model"] = {"preset": "debug-clip-llama", "image_spec": image_spec, "attn_implementation": "sdpa"}
    data["strategy"] = {**data["strategy"], "name": "single", "compile": False}
    data["logging"] = {"report_to": "none", "progress_bar": False}
    for stage in data["stages"]:
        stage["data"].update(
            path=str(synth.align_path if stage["name"] == "align" else synth.finetune_path),
            image_folder=str(synth.root),
            max_length=512,
        )
        stage.update(global_batch_size=2, micro_batch_size=2, max_steps=1, gradient_checkpointing=False)
    result = train(config_from_dict(data))
    for stage in result.stages:
        config = json.loads((stage.export_dir / "config.json").read_text())
        assert config["model_type"] == "llava", stage.name
        reference, info = LlavaForConditionalGeneration.from_pretrained(
            stage.export_dir, output_loading_info=True
        )
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    final = LlavaNextModel.from_pretrained(result.stages[-1].export_dir)
    processor = AutoProcessor.from_pretrained(result.stages[-1].export_dir)
    _assert_same_logits(
        final, reference.eval(), processor, ["<image>\nWhat?"], [[_random_image((40, 90), 5)]]
    )


def test_llava_configs_llavakit_cannot_reproduce_are_refused(saved):
    _, _, _, path = saved
    data = json.loads((path / "config.json").read_text())
    del data["llavakit"]
    with pytest.raises(CheckpointError, match="does not resize and crop"):
        LlavaKitConfig.from_config_json(data, image_processor={"crop_size": {"height": 7, "width": 7}})
    original = {
        "model_type": "llava",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "hidden_size": 8,
    }
    with pytest.raises(CheckpointError, match="convert from-original"):
        LlavaKitConfig.from_config_json(original)
    spec = LlavaKitConfig.from_config_json(
        data
    ).image_spec  # no image processor config: LLaVA-1.5's own padding
    assert (spec.aspect_ratio, spec.merge_type) == ("pad", "flat")
