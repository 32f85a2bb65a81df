"""Video in the model, against transformers' LlavaOnevisionForConditionalGeneration (an implementation nobody here
wrote): same weights, same logits and greedy tokens for a video, and for a batch mixing an image and a video.

The tiny SigLIP has 40 px frames with 8 px patches: a 5² grid that bilinear pooling at stride 2 takes to ceil(5/2)²,
so the rounding transformers and upstream use is exercised. Checkpoints cross both ways without missing or unexpected
keys; video specs transformers cannot run stay ours (``video_token_index: -1``) and round-trip exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import process_image
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ConfigError, DataError
from llavakit.model.config import TRANSFORMERS_VIDEO_SPEC, LlavaKitConfig
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.presets import build_parts

TILE = 40
ATOL = 1e-5
ONEVISION_VIDEO = VideoSpec()  # bilinear, stride 2, one_token, squash: what transformers runs


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts("debug-siglip-qwen2", tmp_path_factory.mktemp("video_parts"), tile_size=TILE)


def _build(
    parts, video_spec: VideoSpec | None = ONEVISION_VIDEO, seed: int = 0, **spec_fields
) -> LlavaNextModel:
    kwargs = parts.from_parts_kwargs()
    kwargs["image_spec"] = replace(kwargs["image_spec"], **{"aspect_ratio": "anyres_max_2", **spec_fields})
    torch.manual_seed(seed)
    return LlavaNextModel.from_parts(**kwargs, video_spec=video_spec).eval()


@pytest.fixture(scope="module")
def pair(parts, tmp_path_factory):
    """Our transformers-compatible video model, its saved folder, and transformers' model loaded from it."""
    model = _build(parts)
    path = model.save_pretrained(tmp_path_factory.mktemp("video_ckpt") / "ckpt")
    reference, info = LlavaOnevisionForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, reference.eval(), path


def _frames(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


def _video_ids(model: LlavaNextModel, frames: int, before: int = 7, after: int = 9) -> list[int]:
    count = model.config.video_spec.count_tokens(frames, model.config.image_spec.grid_side)
    return [before] + [model.config.video_token_id] * count + [after]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_config_json_gives_transformers_the_video_token(pair):
    model, reference, path = pair
    data = json.loads((path / "config.json").read_text())
    assert data["model_type"] == "llava_onevision"
    assert data["video_token_index"] == model.config.video_token_id == reference.config.video_token_id
    assert model.tokenizer.convert_ids_to_tokens(model.config.video_token_id) == "<video>"
    assert data["llavakit"]["video_spec"] == ONEVISION_VIDEO.to_dict()


def test_one_video_matches_transformers(pair):
    model, reference, _ = pair
    frames = _frames(3, seed=1)
    input_ids = torch.tensor([_video_ids(model, 3)])
    assert input_ids.shape[1] == 3 * 3 * 3 + 1 + 2  # 5² grid pooled to 3², one newline after the video
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values_videos=frames, video_frames=torch.tensor([3])).logits
        theirs = reference(input_ids=input_ids, pixel_values_videos=frames[None]).logits
    assert (ours - theirs).abs().max().item() <= ATOL


def test_batch_of_an_image_sample_and_a_video_sample_matches_transformers(pair):
    model, reference, _ = pair
    spec = model.config.image_spec
    image = _image((50, 90), seed=2)
    tiles = process_image(image, spec)
    image_row = [5] + [model.config.image_token_id] * count_visual_tokens((50, 90), spec) + [6]
    video_row = _video_ids(model, 2)
    rows = [image_row, video_row]
    length = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    frames = _frames(2, seed=3)
    image_sizes = torch.tensor([[50, 90]])
    with torch.no_grad():
        ours = model(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=tiles,
            image_sizes=image_sizes,
            pixel_values_videos=frames,
            video_frames=torch.tensor([2]),
        ).logits
        theirs = reference(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=tiles[None],
            image_sizes=image_sizes,
            pixel_values_videos=frames[None],
        ).logits
    keep = mask.bool()
    assert (ours[keep] - theirs[keep]).abs().max().item() <= ATOL


def test_greedy_generation_matches_transformers(pair):
    model, reference, _ = pair
    frames = _frames(4, seed=4)
    input_ids = torch.tensor([_video_ids(model, 4)])
    settings = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    ours = model.generate(input_ids, pixel_values_videos=frames, video_frames=torch.tensor([4]), **settings)
    theirs = reference.generate(input_ids=input_ids, pixel_values_videos=frames[None], **settings)
    assert ours.shape == (1, 6)
    assert torch.equal(ours, theirs[:, input_ids.shape[1] :])


def test_videos_of_different_lengths_in_one_batch_equal_each_alone(pair):
    model, _, _ = pair
    first, second = _frames(2, seed=5), _frames(3, seed=6)
    rows = [_video_ids(model, 2), _video_ids(model, 3)]
    length = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    with torch.no_grad():
        both = model(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values_videos=torch.cat([first, second]),
            video_frames=torch.tensor([2, 3]),
        ).logits
        alone = model(
            input_ids=torch.tensor(rows[:1]), pixel_values_videos=first, video_frames=torch.tensor([2])
        ).logits
    assert (both[0, : len(rows[0])] - alone[0]).abs().max().item() <= ATOL


def test_transformers_checkpoint_loads_with_transformers_video_semantics(pair, tmp_path):
    model, reference, _ = pair
    reference.save_pretrained(tmp_path / "hf")
    model.tokenizer.save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    data = json.loads(config_file.read_text())
    data.pop("llavakit", None)  # a llava-hf checkpoint has no llavakit section
    config_file.write_text(json.dumps(data))
    loaded = LlavaNextModel.from_pretrained(tmp_path / "hf")
    assert loaded.config.video_spec == TRANSFORMERS_VIDEO_SPEC
    assert loaded.config.video_token_id == reference.config.video_token_id
    frames = _frames(2, seed=7)
    input_ids = torch.tensor([_video_ids(model, 2)])
    with torch.no_grad():
        ours = loaded(input_ids=input_ids, pixel_values_videos=frames, video_frames=torch.tensor([2])).logits
        theirs = reference(input_ids=input_ids, pixel_values_videos=frames[None]).logits
    assert (ours - theirs).abs().max().item() <= ATOL


def test_llava_hf_config_without_video_token_has_no_video(pair):
    _, _, path = pair
    data = json.loads((path / "config.json").read_text())
    data.pop("llavakit")
    data["video_token_index"] = -1
    assert LlavaKitConfig.from_config_json(data).video_spec is None
    del data["video_token_index"]
    assert LlavaKitConfig.from_config_json(data).video_token_id is None


@pytest.mark.parametrize(
    "spec",
    [
        VideoSpec(newline="grid", pool_mode="average"),
        VideoSpec(newline="frame", pool_mode="max", pool_stride=3),
        VideoSpec(newline="no_token", frame_view="crop", force_sample=True, frames_upbound=8),
    ],
)
def test_specs_transformers_cannot_run_stay_ours_and_round_trip(parts, tmp_path, spec):
    model = _build(parts, spec)
    path = model.save_pretrained(tmp_path / "ckpt")
    data = json.loads((path / "config.json").read_text())
    assert data["model_type"] == "llava_onevision"
    assert (
        data["video_token_index"] == -1
    )  # transformers runs the images; its video path would count otherwise
    loaded = LlavaNextModel.from_pretrained(path)
    assert loaded.config.video_spec == spec
    assert loaded.config.video_token_id == model.config.video_token_id
    frames = _frames(3, seed=8)
    input_ids = torch.tensor([_video_ids(model, 3)])
    batch = {"input_ids": input_ids, "pixel_values_videos": frames, "video_frames": torch.tensor([3])}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_image_only_model_is_unchanged(parts, pair, tmp_path):
    model = _build(parts, video_spec=None)
    video_model, _, _ = pair
    assert model.config.video_token_id is None
    assert len(model.tokenizer) + 1 == len(video_model.tokenizer)  # only video models get <video>
    data = json.loads(model.save_pretrained(tmp_path / "ckpt").joinpath("config.json").read_text())
    assert data["video_token_index"] == -1
    assert not any("video" in key for key in data["llavakit"])
    assert LlavaNextModel.from_pretrained(tmp_path / "ckpt").config.video_spec is None
    with pytest.raises(DataError, match="takes no videos"):
        model(
            input_ids=torch.tensor([[5, 6]]),
            pixel_values_videos=_frames(1, 0),
            video_frames=torch.tensor([1]),
        )


def test_token_count_mismatch_names_both_counts(pair):
    model, _, _ = pair
    input_ids = torch.tensor([_video_ids(model, 2)[:-3]])  # two video tokens cut off
    with pytest.raises(DataError, match=r"has 17 <video> tokens but its videos yield 19"):
        model(input_ids=input_ids, pixel_values_videos=_frames(2, 0), video_frames=torch.tensor([2]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no pixel_values_videos"),
        ({"pixel_values_videos": _frames(2, 0)}, "without video_frames"),
        ({"pixel_values_videos": _frames(3, 0), "video_frames": torch.tensor([2])}, "sum to 2 frames"),
        (
            {"pixel_values_videos": _frames(2, 0), "video_frames": torch.tensor([2, 0])},
            "must all be positive",
        ),
    ],
)
def test_inconsistent_video_inputs_are_refused(pair, kwargs, message):
    model, _, _ = pair
    with pytest.raises(DataError, match=message):
        model(input_ids=torch.tensor([_video_ids(model, 2)]), **kwargs)


def test_video_frames_without_videos_are_refused(pair):
    model, _, _ = pair
    with pytest.raises(DataError, match="without pixel_values_videos"):
        model(input_ids=torch.tensor([[5, 6]]), video_frames=torch.tensor([2]))


def test_newline_without_image_newline_is_refused(parts):
    with pytest.raises(ConfigError, match="no_token"):
        _build(parts, VideoSpec(newline="frame"), merge_type="spatial", aspect_ratio="anyres")
    assert (
        _build(
            parts, VideoSpec(newline="no_token"), merge_type="spatial", aspect_ratio="anyres"
        ).image_newline
        is None
    )


def test_config_needs_spec_and_token_together(pair):
    model, _, _ = pair
    with pytest.raises(ConfigError, match="set together"):
        replace(model.config, video_token_id=None)


def _vision_parameters_without_grad(model: LlavaNextModel, **batch) -> list[str]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return [name for name, p in model.named_parameters() if not name.startswith("llm.") and p.grad is None]


def test_training_on_videos_reaches_the_vision_parameters_images_reach(pair):
    model, _, _ = pair
    spec = model.config.image_spec
    model.train()
    try:
        video_ids = torch.tensor([_video_ids(model, 2)])
        video_frames = {"pixel_values_videos": _frames(2, 9), "video_frames": torch.tensor([2])}
        by_video = _vision_parameters_without_grad(
            model, input_ids=video_ids, labels=video_ids, **video_frames
        )
        assert model.image_newline.grad.abs().sum() > 0
        image_ids = torch.tensor([[5] + [model.config.image_token_id] * count_visual_tokens((30, 30), spec)])
        tiles = process_image(_image((30, 30), seed=9), spec)
        image_batch = {"pixel_values": tiles, "image_sizes": torch.tensor([[30, 30]])}
        by_image = _vision_parameters_without_grad(
            model, input_ids=image_ids, labels=image_ids, **image_batch
        )
        assert by_video == by_image  # the encoder layers the select layer skips, if any, and nothing else
        assert not any(
            name.startswith(("projector.", "vision_encoder.model.embeddings")) for name in by_video
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _media_batches(model: LlavaNextModel) -> dict[str, dict[str, torch.Tensor]]:
    """A text-only, an image-only, a video-only and an image+video (one sample with both) training batch."""
    spec = model.config.image_spec
    image_row = [5] + [model.config.image_token_id] * count_visual_tokens((50, 90), spec) + [6]
    video_row = _video_ids(model, 2)
    images = {
        "pixel_values": process_image(_image((50, 90), seed=10), spec),
        "image_sizes": torch.tensor([[50, 90]]),
    }
    videos = {"pixel_values_videos": _frames(2, seed=11), "video_frames": torch.tensor([2])}
    rows = {"text": [5, 6, 7], "image": image_row, "video": video_row, "image+video": image_row + video_row}
    media = {"text": {}, "image": images, "video": videos, "image+video": {**images, **videos}}
    return {
        kind: {"input_ids": torch.tensor([row]), "labels": torch.tensor([row]), **media[kind]}
        for kind, row in rows.items()
    }


@pytest.mark.parametrize("kind", ["text", "image", "video", "image+video"])
def test_every_training_forward_runs_the_vision_encoder_and_projector_once(pair, kind):
    """Under FSDP2 each call of a sharded vision layer is an all-gather: ranks whose micro-batches hold
    different media must make the same number of calls, or they hang. Tiles and frames go in one call."""
    model, _, _ = pair
    batch = _media_batches(model)[kind]
    calls: dict[str, list[int]] = {"vision_encoder": [], "projector": []}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _, args, __, name=name: calls[name].append(args[0].shape[0])
        )
        for name in calls
    ]
    model.train()
    try:
        model(**batch).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    tiles = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    frames = batch["pixel_values_videos"].shape[0] if "pixel_values_videos" in batch else 0
    assert calls["vision_encoder"] == [tiles + frames or 1]  # a text-only batch runs one blank tile
    assert len(calls["projector"]) == 1


def test_image_and_video_encoded_together_equal_each_encoded_alone(pair):
    model, _, _ = pair
    batch = _media_batches(model)["image+video"]
    with torch.no_grad():
        together = model.embed_inputs(
            batch["input_ids"],
            batch["pixel_values"],
            batch["image_sizes"],
            pixel_values_videos=batch["pixel_values_videos"],
            video_frames=batch["video_frames"],
        )
        (image,) = model.encode_images(batch["pixel_values"], batch["image_sizes"])
        (video,) = model.encode_videos(batch["pixel_values_videos"], batch["video_frames"])
    ids = batch["input_ids"][0]
    torch.testing.assert_close(together[0, ids == model.config.image_token_id], image, rtol=0, atol=ATOL)
    torch.testing.assert_close(together[0, ids == model.config.video_token_id], video, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["text", "image", "video", "image+video"])
def test_no_token_videos_keep_every_vision_parameter_in_the_graph(parts, kind):
    """A ``no_token`` video leaves ``image_newline`` unused: it still gets a (zero) gradient, as DDP/FSDP need
    the same parameters used on every rank; the vision parameters reached are those an image batch reaches."""
    model = _build(parts, VideoSpec(newline="no_token"))
    batches = _media_batches(model)
    model.train()
    reference = _vision_parameters_without_grad(model, **batches["image"])
    assert _vision_parameters_without_grad(model, **batches[kind]) == reference
    assert model.image_newline.grad is not None
    assert not any(name.startswith(("projector.", "vision_encoder.model.embeddings")) for name in reference)
