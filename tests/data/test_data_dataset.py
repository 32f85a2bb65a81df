"""Formats, bad input, the skip policy, truncation and the dataset scan, on tiny files and images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from data_helpers import chat, write_image, write_json
from PIL import Image

from llavakit.anyres.geometry import count_visual_tokens, grid_shape
from llavakit.data.collate import build_collator
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.formats import Record, parse_sample, read_records
from llavakit.data.issues import IssueLog
from llavakit.data.templates import get_template
from llavakit.data.tokenize import IGNORE_INDEX, SampleEncoder
from llavakit.errors import ConfigError, DataError, ImageError


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path / "img" / "wide.png", 40, 70)
    write_image(tmp_path / "img" / "tall.png", 90, 30)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not an image at all")
    return tmp_path


def config(path, folder, **overrides):
    values = {"model_max_length": 512, **overrides}
    return DataConfig(data_path=str(path), image_folder=str(folder / "img"), **values)


def good_samples():
    return [
        chat("What is it? <image>", "A red box.", image="wide.png", sample_id="one"),
        chat("Hello there", "Hi.", sample_id="text"),
        chat("<image> and <image>: same?", "No.", image=["wide.png", "tall.png"], sample_id="multi"),
    ]


@pytest.mark.parametrize("jsonl", [False, True])
def test_dataset_items_expand_images_exactly(folder, tokenizers, tiny_spec, jsonl):
    path = write_json(folder / ("d.jsonl" if jsonl else "d.json"), good_samples(), jsonl=jsonl)
    dataset = build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)
    image_id = tokenizers["llama"].convert_tokens_to_ids("<image>")
    single, text, multi = (dataset[i] for i in range(3))
    assert (single["input_ids"] == image_id).sum() == count_visual_tokens((40, 70), tiny_spec)
    rows, cols = grid_shape((40, 70), tiny_spec)
    assert single["pixel_values"].shape[0] == 1 + rows * cols and single["image_tiled"] == [True]
    assert text["pixel_values"] is None
    assert multi["pixel_values"].shape[0] == 2 and multi["image_tiled"] == [False, False]
    assert (multi["input_ids"] == image_id).sum() == 2 * count_visual_tokens((40, 70), tiny_spec, tiled=False)
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(3)]
    assert [n > 0 for n in dataset.modality_lengths] == [True, False, True]


def test_collator_mixes_text_and_images(folder, tokenizers, tiny_spec):
    path = write_json(folder / "d.json", good_samples())
    dataset = build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)
    batch = build_collator(tokenizers["llama"])([dataset[0], dataset[1], dataset[2]])
    lengths = [len(dataset[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    rows, cols = grid_shape((40, 70), tiny_spec)
    assert batch["pixel_values"].shape[0] == (1 + rows * cols) + 2
    assert batch["image_sizes"].tolist() == [[40, 70], [40, 70], [90, 30]]
    assert batch["image_tiled"].tolist() == [True, False, False]
    assert batch["num_padding"] == 3 * max(lengths) - sum(lengths)


def test_text_only_batch_has_no_image_keys(folder, tokenizers, tiny_spec):
    path = write_json(
        folder / "d.json", [chat("Hello", "Hi.", sample_id="a"), chat("Bye", "Ciao.", sample_id="b")]
    )
    dataset = build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)
    batch = build_collator(tokenizers["llama"])([dataset[0], dataset[1]])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 2


def test_malformed_json_names_file_and_line(folder):
    path = folder / "bad.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b", oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        list(read_records(path, IssueLog("error")))
    lines = folder / "bad.jsonl"
    lines.write_text('{"id": "a"}\n{broken\n{"id": "c"}\n')
    issues = IssueLog("skip")
    assert [r.location for r in read_records(lines, issues)] == [f"{lines}:1", f"{lines}:3"]
    assert issues.counts["json"] == 1 and f"{lines}:2" in issues.examples["json"][0]


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (chat("a", "b", "c", sample_id="x") | {"conversations": []}, "non-empty list"),
        (
            {"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "out of order",
        ),
        (
            chat("<image> <image>", "b", image="wide.png", sample_id="x"),
            "2 <image> placeholders but 1 images",
        ),
        (chat("hi", "b", image="wide.png", sample_id="x"), "0 <image> placeholders but 1 images"),
        ({"id": "x", "conversations": [{"from": "robot", "value": "a"}]}, "role 'robot'"),
    ],
)
def test_bad_samples_name_sample_and_problem(sample, message):
    with pytest.raises(DataError, match=message) as err:
        parse_sample(Record("f.json:7", sample))
    assert "'x'" in str(err.value) and "f.json:7" in str(err.value)


def test_role_content_system_and_leading_gpt_turns():
    sample = parse_sample(
        Record(
            "f:1",
            {
                "id": "r",
                "conversations": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "assistant", "content": "dropped"},
                    {"role": "user", "content": "Look <image>"},
                    {"role": "assistant", "content": "ok"},
                ],
                "image": "a.png",
            },
        )
    )
    assert sample.conversation.system == "Be brief."
    assert [t.role for t in sample.conversation.turns] == ["user", "assistant"]
    assert sample.conversation.turns[0].text == "<image>\nLook"


def test_multi_image_text_is_left_as_written():
    sample = parse_sample(Record("f:1", chat("A <image> B <image>", "ok", image=["a.png", "b.png"])))
    assert sample.conversation.turns[0].text == "A <image> B <image>"


def test_missing_and_corrupt_images_error_or_skip(folder, tokenizers, tiny_spec):
    samples = good_samples() + [
        chat("<image>", "x", image="absent.png", sample_id="gone"),
        chat("<image>", "x", image="corrupt.png", sample_id="broken"),
    ]
    path = write_json(folder / "d.json", samples)
    with pytest.raises(ImageError, match="absent.png"):
        build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)
    dataset = build_dataset(
        config(path, folder, skip_policy="skip", max_skip_fraction=0.5), tokenizers["llama"], tiny_spec
    )
    assert len(dataset) == 3 and dataset.stats.issues.counts["image"] == 2
    assert "'gone'" in dataset.stats.summary() and "corrupt.png" in dataset.stats.summary()
    with pytest.raises(DataError, match="more than max_skip_fraction"):
        build_dataset(
            config(path, folder, skip_policy="skip", max_skip_fraction=0.2), tokenizers["llama"], tiny_spec
        )


def test_sample_without_supervised_tokens_is_reported(folder, tokenizers, tiny_spec):
    # The reply lies beyond model_max_length, so truncation leaves only the prompt.
    path = write_json(folder / "d.json", [chat("Hello", "Hi.", sample_id="cut")])
    with pytest.raises(DataError, match="'cut'.*no supervised token"):
        build_dataset(config(path, folder, model_max_length=20), tokenizers["llama"], tiny_spec)


def test_truncation_never_cuts_an_image(folder, tokenizers, tiny_spec):
    samples = [
        chat("Describe.", "There are three shapes. " * 40, sample_id="cut-text"),
        chat("Describe. <image>", "ok", image="tall.png", sample_id="image-inside"),
    ]
    path = write_json(folder / "d.json", samples)
    single = count_visual_tokens((90, 30), tiny_spec, tiled=False)
    assert count_visual_tokens((90, 30), tiny_spec) > single
    encoder = SampleEncoder(tokenizers["llama"], get_template("vicuna_v1"))
    # The cap fits the image as one tile, not its full tiling (the cut would go through the image).
    cap = len(encoder.encode(parse_sample(Record("d", samples[1])).conversation, [single]).input_ids)
    # One of two samples dropped is over the default max_skip_fraction: refused with the counts and the fixes.
    with pytest.raises(DataError, match=r"(?s)1 of 2 samples are longer than max_length .*truncation_policy=downscale"):
        build_dataset(config(path, folder, model_max_length=cap), tokenizers["llama"], tiny_spec)
    allowed = config(path, folder, model_max_length=cap, max_skip_fraction=0.5)
    dropped = build_dataset(allowed, tokenizers["llama"], tiny_spec)
    assert dropped.stats.num_dropped_too_long == 1 and dropped.stats.num_truncated == 1
    assert [e.sample.id for e in dropped.entries] == ["cut-text"] and dropped.lengths == [cap]
    downscaled = build_dataset(
        config(path, folder, model_max_length=cap, truncation_policy="downscale"),
        tokenizers["llama"],
        tiny_spec,
    )
    assert downscaled.stats.num_downscaled == 1 and downscaled.entries[1].image_tiled == (False,)
    item = downscaled[1]
    assert item["pixel_values"].shape[0] == 1 and len(item["input_ids"]) == cap
    assert (item["input_ids"] == tokenizers["llama"].convert_tokens_to_ids("<image>")).sum() == single


def test_config_rejects_unknown_choices():
    with pytest.raises(ConfigError, match="truncation_policy"):
        DataConfig(data_path="x.json", truncation_policy="cut")
    with pytest.raises(ConfigError, match="skip_policy"):
        DataConfig(data_path="x.json", skip_policy="ignore")


def test_unknown_template_is_an_error(folder, tokenizers, tiny_spec):
    path = write_json(folder / "d.json", good_samples())
    with pytest.raises(ConfigError, match="unknown chat template 'vicuna'"):
        build_dataset(config(path, folder, template="vicuna"), tokenizers["llama"], tiny_spec)


def test_collator_needs_a_pad_token(tokenizers):
    from llavakit.model.tokenizer import build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer("llama")
    tokenizer.pad_token = None
    with pytest.raises(ConfigError, match="no pad token"):
        build_collator(tokenizer)


def test_skipped_items_are_dropped_and_counted(folder, tokenizers, tiny_spec):
    path = write_json(folder / "d.json", good_samples())
    dataset = build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)
    batch = build_collator(tokenizers["llama"])([dataset[1], None])
    assert batch["num_skipped"] == 1 and batch["input_ids"].shape[0] == 1
    assert torch.equal(batch["input_ids"][0], dataset[1]["input_ids"])


def test_image_corrupt_after_its_header_fails_at_load_with_sample_id(folder, tokenizers, tiny_spec):
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, format="JPEG", quality=95)
    (folder / "img" / "truncated.jpg").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    path = write_json(
        folder / "d.json", [chat("<image>\nWhat?", "A box.", image="truncated.jpg", sample_id="half")]
    )
    dataset = build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)  # the header reads fine
    with pytest.raises(ImageError, match=r"sample 'half'.*truncated\.jpg"):
        dataset[0]
    skipping = build_dataset(config(path, folder, skip_policy="skip"), tokenizers["llama"], tiny_spec)
    assert skipping[0] is None


def test_cached_samples_are_built_once_and_equal_uncached_ones(folder, tokenizers, tiny_spec, monkeypatch):
    import llavakit.data.dataset as dataset_module

    path = write_json(folder / "d.json", good_samples())
    plain = build_dataset(config(path, folder), tokenizers["llama"], tiny_spec)
    cached = build_dataset(config(path, folder, cache_samples=True), tokenizers["llama"], tiny_spec)
    loads = []
    original = dataset_module.load_pixels
    monkeypatch.setattr(dataset_module, "load_pixels", lambda *args: loads.append(args[0]) or original(*args))
    first = [cached[i] for i in range(3)]
    assert len(loads) == 3  # one image, none, two images
    again = [cached[i] for i in range(3)]
    assert len(loads) == 3 and all(a is b for a, b in zip(first, again))
    for item, reference in zip(first, (plain[i] for i in range(3))):
        assert item.keys() == reference.keys()
        for key, value in reference.items():
            if torch.is_tensor(value):
                assert torch.equal(item[key], value)
            else:
                assert item[key] == value
    assert len(loads) == 6  # the plain dataset decodes every time


def test_collating_cached_samples_leaves_them_unchanged(folder, tokenizers, tiny_spec):
    from llavakit.data.packing import PackingCollator

    path = write_json(folder / "d.json", good_samples())
    cached = build_dataset(config(path, folder, cache_samples=True), tokenizers["llama"], tiny_spec)
    items = [cached[i] for i in range(3)]
    before = [{k: v.clone() if torch.is_tensor(v) else v for k, v in item.items()} for item in items]
    pad_id = tokenizers["llama"].pad_token_id
    collators = [build_collator(tokenizers["llama"]), lambda batch: PackingCollator(pad_id)([batch])]
    for collate in collators:
        first, second = collate(items), collate(items)
        assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])
    for item, reference in zip(items, before):
        for key, value in reference.items():
            assert torch.equal(item[key], value) if torch.is_tensor(value) else item[key] == value


def test_cached_samples_refuse_dataloader_workers():
    from llavakit.training.config import DataSection

    with pytest.raises(ConfigError, match="cache_samples needs data.num_workers 0"):
        DataSection(path="d.json", cache_samples=True, num_workers=2)
    assert DataSection(path="d.json", cache_samples=True).cache_samples


def test_the_configured_system_prompt_is_trained(folder, tokenizers, tiny_spec):
    path = write_json(folder / "d.json", [chat("Hello there", "Hi.", sample_id="text")])
    tokenizer = tokenizers["llama"]
    item = build_dataset(config(path, folder, system_prompt="Answer the questions."), tokenizer, tiny_spec)[0]
    text = tokenizer.decode(item["input_ids"], skip_special_tokens=True)
    assert text == "Answer the questions. USER: Hello there ASSISTANT: Hi."
    with pytest.raises(ConfigError, match="data.system_prompt: template 'plain' ignores"):
        build_dataset(config(path, folder, template="plain", system_prompt="Answer."), tokenizer, tiny_spec)
