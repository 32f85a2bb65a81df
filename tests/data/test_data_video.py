"""Video samples in the data pipeline: LLaVA-Video JSON (``video`` key, ``<image>`` meaning the video) through the
scan, the index, ``__getitem__``, collation and packing, on a tiny video model.

Oracles: the model itself (`LlavaNextModel.encode_videos` gives each video's token count from the collated frames,
which must equal the ``<video>`` runs the data layer wrote), `load_video` (which decodes, where the scan only
probes) for frame counts and upstream's time instruction, and upstream's text rules restated here
(``preprocess_multimodal`` moving a lone placeholder to the front, ``_get_item`` writing the instruction).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.anyres.video import load_video, time_instruction
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.collate import build_collator
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.inspect import InspectOptions, inspect_data
from llavakit.data.packing import PackingCollator
from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.errors import ConfigError, DataError, VideoError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.presets import build_parts

pytest.importorskip("av")

from video_helpers import encode_video  # noqa: E402  (needs av)

SPEC = VideoSpec(frames_upbound=4, video_fps=1, newline="grid")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts("debug-siglip-qwen2", tmp_path_factory.mktemp("video_data_parts"), tile_size=32)


def _model(parts, video_spec: VideoSpec | None = SPEC) -> LlavaNextModel:
    torch.manual_seed(0)
    return LlavaNextModel.from_parts(**parts.from_parts_kwargs(), video_spec=video_spec).eval()


@pytest.fixture(scope="module")
def model(parts):
    return _model(parts)


def _write_media(root: Path) -> None:
    (root / "videos" / "frames_clip").mkdir(parents=True)
    (root / "images").mkdir()
    encode_video(
        root / "videos" / "ten.mp4", frames=10, fps=2
    )  # 5 s at 2 fps: every 2nd frame, 5 > 4: linspace
    encode_video(root / "videos" / "three.mp4", frames=3, fps=1)  # 3 frames, all sampled
    rng = np.random.default_rng(0)
    for number in range(12):  # frame folder: upstream's 10 frames by linspace
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "videos" / "frames_clip" / f"frame_{number:02d}.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


RECORDS = [
    {"id": "vid", "video": "ten.mp4", "conversations": _turns("What happens? <image>", "A colour change.")},
    {"id": "img", "image": "../images/a.png", "conversations": _turns("<image>\nWhat is it?", "Noise.")},
    {"id": "txt", "conversations": _turns("Hello", "Hi there.")},
    {"id": "folder", "video": "frames_clip", "conversations": _turns("<image>\nDescribe.", "Noise frames.")},
    {
        "id": "mixed",
        "image": "../images/a.png",
        "video": "three.mp4",
        "conversations": _turns("Compare <image> with <video> please.", "They differ."),
    },
]


def _data(root: Path, records: list[dict]) -> Path:
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def media(tmp_path):
    _write_media(tmp_path)
    return tmp_path


def _build(model, root: Path, records=RECORDS, video_spec=SPEC, **fields):
    config = DataConfig(
        data_path=str(_data(root, records)),
        image_folder=str(root / "videos"),
        video_folder=str(root / "videos"),
        template="qwen_2",
        **fields,
    )
    return build_dataset(config, model.tokenizer, model.config.image_spec, video_spec=video_spec)


def test_items_match_the_model_token_counts_and_mask_videos(model, media):
    dataset = _build(model, media)
    items = {item["id"]: item for item in (dataset[i] for i in range(len(dataset)))}
    assert set(items) == {"vid", "img", "txt", "folder", "mixed"}
    spec, tile = model.config.video_spec, model.config.image_spec.tile_size
    expected_frames = {
        "vid": len(load_video(media / "videos" / "ten.mp4", spec).frames),
        "folder": len(load_video(media / "videos" / "frames_clip", spec).frames),
        "mixed": len(load_video(media / "videos" / "three.mp4", spec).frames),
    }
    assert expected_frames == {"vid": 4, "folder": 10, "mixed": 3}
    for sample_id, item in items.items():
        ids, labels = item["input_ids"], item["labels"]
        is_video = ids == model.config.video_token_id
        assert not bool((labels[is_video] != IGNORE_INDEX).any())
        if sample_id not in expected_frames:
            assert item["pixel_values_videos"] is None and not bool(is_video.any())
            continue
        frames = expected_frames[sample_id]
        assert item["video_frames"] == [frames]
        assert tuple(item["pixel_values_videos"].shape) == (frames, 3, tile, tile)
        with torch.no_grad():
            (features,) = model.encode_videos(item["pixel_values_videos"], item["video_frames"])
        assert int(is_video.sum()) == features.shape[0]  # the model's own count
        run = torch.nonzero(is_video).flatten()
        assert bool((run.diff() == 1).all()), "one consecutive run per video"
    lengths = dict(zip((dataset.entries[i].sample.id for i in range(len(dataset))), dataset.lengths))
    assert all(lengths[key] == len(item["input_ids"]) for key, item in items.items())
    signed = dict(zip((dataset.entries[i].sample.id for i in range(len(dataset))), dataset.modality_lengths))
    assert signed["txt"] < 0 < min(signed["vid"], signed["folder"], signed["img"], signed["mixed"])


def test_placeholder_placed_and_time_instruction_as_upstream(parts, media):
    spec = VideoSpec(frames_upbound=4, add_time_instruction=True)
    model = _model(parts, spec)
    dataset = _build(model, media, records=RECORDS[:1] + RECORDS[3:4], video_spec=spec)
    for index, (name, question) in enumerate((("ten.mp4", "What happens? "), ("frames_clip", "\nDescribe."))):
        sentence = time_instruction(load_video(media / "videos" / name, spec))
        # upstream: f"<image>\n{instruction}\n{value.replace('<image>', '')}", <image> being the video
        assert dataset.entries[index].sample.conversation.turns[0].text == f"<video>\n{sentence}\n{question}"
    assert "0.00s,1.50s,3.00s,4.50s" in dataset.entries[0].sample.conversation.turns[0].text

    plain = _build(_model(parts), media, records=RECORDS[:1])
    assert plain.entries[0].sample.conversation.turns[0].text == "<video>\nWhat happens?"


def test_collated_batch_runs_through_the_model(model, media):
    dataset = _build(model, media)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = build_collator(model.tokenizer)(examples)
    assert batch["video_frames"].tolist() == [4, 10, 3]
    assert batch["pixel_values_videos"].shape[0] == 17 and batch["pixel_values"] is not None
    inputs = {
        k: v for k, v in batch.items() if k not in ("num_tokens", "num_padding", "num_skipped", "sample_ids")
    }
    with torch.no_grad():
        loss = model(**inputs).loss
    assert torch.isfinite(loss)

    packed = PackingCollator(model.tokenizer.pad_token_id, attn_implementation="sdpa")(
        [examples[:2], examples[2:]]
    )
    assert packed["video_frames"].tolist() == [4, 10, 3]
    assert torch.equal(packed["pixel_values_videos"], batch["pixel_values_videos"])


def test_index_reused_and_rebuilt_when_the_video_spec_or_a_video_changes(parts, model, media):
    index = media / "index"
    first = _build(model, media, records=RECORDS[:2])

    def build(video_spec, model=model):
        config = DataConfig(
            data_path=str(media / "data.json"),
            image_folder=str(media / "videos"),
            video_folder=str(media / "videos"),
            template="qwen_2",
        )
        return build_dataset(
            config, model.tokenizer, model.config.image_spec, index_dir=index, video_spec=video_spec
        )

    cold = build(SPEC)
    warm = build(SPEC)
    assert len(list(index.iterdir())) == 1 and warm.entries.source == cold.entries.source
    assert warm.lengths == cold.lengths == first.lengths
    assert warm.entries[0].video_frames == (4,)

    fewer = VideoSpec(frames_upbound=2, newline="grid")
    changed = build(fewer, _model(parts, fewer))
    assert len(list(index.iterdir())) == 2
    assert changed.entries[0].video_frames == (2,)
    assert changed.lengths[0] < cold.lengths[0]

    encode_video(media / "videos" / "ten.mp4", frames=3, fps=1)  # re-encoded in place: 3 frames now
    rescanned = build(SPEC)
    assert len(list(index.iterdir())) == 3 and rescanned.entries[0].video_frames == (3,)


def test_bad_videos_are_skipped_and_counted_or_named(model, media):
    records = [
        *RECORDS[:3],
        {"id": "corrupt", "video": "broken.mp4", "conversations": _turns("<image>\nWhat?", "Nothing.")},
        {"id": "absent", "video": "nope.mp4", "conversations": _turns("<image>\nWhat?", "Nothing.")},
    ]
    dataset = _build(model, media, records=records, skip_policy="skip", max_skip_fraction=0.5)
    assert len(dataset) == 3 and dataset.stats.issues.counts["video"] == 2
    report = dataset.stats.summary()
    assert (
        "corrupt" in report and "broken.mp4" in report and "nope.mp4" in report and "video_folder" in report
    )

    with pytest.raises(VideoError, match=r"'corrupt'.*broken\.mp4"):
        _build(model, media, records=records[3:4])

    # a file that breaks after the scan: None under skip (the collator counts it), named under error
    dataset = _build(model, media, records=RECORDS[:1], skip_policy="skip")
    (media / "videos" / "ten.mp4").write_bytes(b"garbage" * 10)
    assert dataset[0] is None


def test_decoding_error_in_getitem_names_sample_and_file(model, media):
    dataset = _build(model, media, records=RECORDS[:1])
    encode_video(media / "videos" / "ten.mp4", frames=3, fps=1)  # fewer frames than scanned
    with pytest.raises(VideoError, match=r"sample 'vid'.*ten\.mp4.*scan found 4"):
        dataset[0]


def test_model_without_video_and_ambiguous_samples_fail_clearly(parts, media):
    no_video = _model(parts, None)
    with pytest.raises(ConfigError, match=r"sample 'vid'.*no video support.*model\.video_spec"):
        _build(no_video, media, records=RECORDS[:1], video_spec=None, skip_policy="skip")
    both = [
        {
            "id": "both",
            "image": "../images/a.png",
            "video": "three.mp4",
            "conversations": _turns("<image>", "x"),
        }
    ]
    with pytest.raises(DataError, match=r"'both'.*both 'image' and 'video'.*<video>"):
        _build(_model(parts), media, records=both)


def test_inspect_counts_videos_and_frames(model, media):
    options = InspectOptions(
        data_path=str(_data(media, RECORDS)),
        image_folder=str(media / "videos"),
        template="qwen_2",
        video_spec=SPEC,
    )
    report = inspect_data(options, model.tokenizer, model.config.image_spec)
    assert (
        report.num_with_videos == 3 - 1
    )  # "mixed" counts as an image sample, as upstream reads "image" first
    assert report.frames_per_video == {4: 1, 10: 1, 3: 1}
    text = report.render()
    assert "with videos: 2" in text and "frames per video:" in text and text.endswith("PASS")

    without = inspect_data(
        InspectOptions(data_path=options.data_path, image_folder=options.image_folder, template="qwen_2"),
        model.tokenizer,
        model.config.image_spec,
    )
    assert without.issues.counts["video"] == 3 and "model.video_spec" in without.render()


def test_data_inspect_cli_reads_the_video_spec_from_the_checkpoint(model, media, tmp_path, capsys):
    from llavakit.cli.main import main

    checkpoint = model.save_pretrained(tmp_path / "ckpt")
    common = ["data", "inspect", str(_data(media, RECORDS)), "--image-folder", str(media / "videos")]
    common += ["--tokenizer", str(checkpoint), "--template", "qwen_2"]
    assert main([*common, "--image-spec", str(checkpoint / "config.json")]) == 0
    assert "with videos: 2" in capsys.readouterr().out
    spec_file = tmp_path / "video_spec.json"
    spec_file.write_text(json.dumps(SPEC.to_dict()))
    assert main([*common, "--video-spec", str(spec_file), "--video-folder", str(media / "videos")]) == 0
    assert "frames per video:" in capsys.readouterr().out
    # Without a video spec, the video samples are bad and named with the fix.
    assert main(common) == 1
    assert "model.video_spec" in capsys.readouterr().out


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 24])
def test_the_video_key_search_reads_in_chunks(tmp_path, chunk):
    from llavakit.data.videos import _mentions_video

    cases = {b'[{"id": 1, "vid': False, b"x" * 30 + b'"video"  :"a"': True, b'"vide" "o":': False}
    for text, expected in cases.items():
        (tmp_path / "a.json").write_bytes(text)
        assert _mentions_video(tmp_path / "a.json", chunk) is expected, text
