"""The synthetic dataset: deterministic, truthful answers, held-out split disjoint from training, readable by the
data layer, cached by manifest."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from llavakit.data.synth import (
    BACKGROUND,
    CELL,
    COLOURS,
    GLYPH_SIZE,
    PLATE_COLOUR,
    QUESTION_TYPES,
    TEXT_COLOUR,
    TEXT_GRID,
    WORDS,
    Scene,
    SynthConfig,
    generate_synth,
    render_scene,
    sample_scene,
    scene_questions,
)
from llavakit.errors import DataError

SMALL = SynthConfig(n_train=40, n_heldout=10, seed=3)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth"), SMALL)


def test_same_seed_gives_identical_files(small_dataset, tmp_path):
    again = generate_synth(tmp_path / "again", SMALL)
    assert _file_hashes(again.root) == _file_hashes(small_dataset.root)


def test_other_seed_gives_other_images(small_dataset, tmp_path):
    other = generate_synth(tmp_path / "other", SynthConfig(n_train=40, n_heldout=10, seed=4))
    assert _file_hashes(other.root) != _file_hashes(small_dataset.root)


def test_heldout_images_never_reach_training(small_dataset):
    root = small_dataset.root
    train_hashes = {h for p, h in _file_hashes(root).items() if p.startswith("images/train/")}
    heldout_hashes = {h for p, h in _file_hashes(root).items() if p.startswith("images/heldout/")}
    assert len(heldout_hashes) == SMALL.n_heldout
    assert not train_hashes & heldout_hashes
    training_text = small_dataset.align_path.read_text() + small_dataset.finetune_path.read_text()
    assert "images/heldout/" not in training_text


def test_heldout_records_cover_every_type_with_one_word_answers(small_dataset):
    records = [json.loads(line) for line in small_dataset.heldout_path.read_text().splitlines()]
    assert {record["type"] for record in records} == set(QUESTION_TYPES)
    assert len({record["question_id"] for record in records}) == len(records)
    for record in records:
        assert len(record["answer"].split()) == 1
        assert (small_dataset.root / record["image"]).is_file()


def test_finetune_has_multi_turn_text_only_and_multi_image_samples(small_dataset):
    records = json.loads(small_dataset.finetune_path.read_text())
    assert any(len(r["conversations"]) > 2 for r in records)
    assert any("image" not in r for r in records)
    assert any(isinstance(r.get("image"), list) and len(r["image"]) == 2 for r in records)


def test_the_data_layer_parses_every_sample(small_dataset):
    """Oracle: the training data layer's own LLaVA parser (placeholder/image counts, turn order)."""
    from llavakit.data.formats import Record, parse_sample

    for path in (small_dataset.align_path, small_dataset.finetune_path):
        for number, data in enumerate(json.loads(path.read_text())):
            sample = parse_sample(Record(f"{path}:{number}", data))
            expected = data.get("image", [])
            assert list(sample.images) == (expected if isinstance(expected, list) else [expected])


def test_answers_match_the_pixels():
    """Colour answers are checked against the rendered pixel at the shape's centre, positions against its cell."""
    rng = random.Random(11)
    for _ in range(50):
        scene = sample_scene(rng)
        image = render_scene(scene)
        assert (image.height, image.width) == (scene.height, scene.width)
        for shape, (dy, dx) in zip(scene.shapes, scene.jitter):
            centre = (shape.col * CELL + CELL // 2 + dx, shape.row * CELL + CELL // 2 + dy)
            assert image.getpixel(centre) == COLOURS[shape.colour]
        answers = {qa.type: qa.answer for qa in scene_questions(scene)}
        if "colour" in answers:
            (shape,) = scene.shapes
            assert (answers["colour"], answers["shape"]) == (shape.colour, shape.kind)
        assert answers["count"] == ("zero", "one", "two", "three", "four")[len(scene.shapes)]


def _colour_centroid(image, colour: tuple[int, int, int]) -> tuple[float, float]:
    points = [(x, y) for x in range(image.width) for y in range(image.height) if image.getpixel((x, y)) == colour]
    return sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)


def test_position_answers_match_the_pixels():
    """Each position answer agrees with where the shape's colour and the word's white letters sit in the image."""
    rng = random.Random(5)
    asked = {"left or right of": 0, "above or below": 0}
    for _ in range(200):
        scene = sample_scene(rng)
        for qa in scene_questions(scene):
            if qa.type != "position":
                continue
            match = re.fullmatch(r"Is the shape (left or right of|above or below) the word\?", qa.question)
            assert match, qa.question
            asked[match[1]] += 1
            image = render_scene(scene)
            xa, ya = _colour_centroid(image, COLOURS[scene.shapes[0].colour])
            xb, yb = _colour_centroid(image, TEXT_COLOUR)
            if match[1] == "left or right of":
                assert qa.answer == ("left" if xa < xb else "right")
            else:
                assert qa.answer == ("above" if ya < yb else "below")
    assert min(asked.values()) > 10, asked


def test_position_questions_need_one_shape_and_a_word():
    rng = random.Random(6)
    for _ in range(200):
        scene = sample_scene(rng)
        asked = any(qa.type == "position" for qa in scene_questions(scene))
        assert asked == (len(scene.shapes) == 1 and scene.word is not None)


def test_words_are_too_small_for_the_base_view_alone():
    """A rendered word fits in one 32 px cell, so squashing a 128 px wide canvas to one tile shrinks it 4x."""
    scene = Scene(height=64, width=128, shapes=(), word="cup", word_cell=(0, 1), jitter=((0, 0),))
    image = render_scene(scene)
    # Note: the background sums to 344 and white text to 765; anti-aliased glyph edges lie between.
    text = [(x, y) for x in range(image.width) for y in range(image.height) if sum(image.getpixel((x, y))) > 500]
    assert text, "the word was not drawn"
    assert max(x for x, _ in text) - min(x for x, _ in text) + 1 <= CELL
    assert all(CELL <= x < 2 * CELL and y < CELL for x, y in text)


def test_every_word_stays_inside_its_cell_on_the_patch_grid_whatever_the_jitter():
    """A word spilling into the next cell would show in two AnyRes tiles; its plate starts on the 8 px grid, so each
    letter fills the same patches wherever it is printed."""
    offsets = set()
    for word in WORDS:
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                scene = Scene(height=64, width=128, shapes=(), word=word, word_cell=(1, 2), jitter=((dy, dx),))
                image = render_scene(scene)
                drawn = [(x, y) for x in range(image.width) for y in range(image.height) if image.getpixel((x, y)) != BACKGROUND]
                assert all(2 * CELL <= x < 3 * CELL and CELL <= y < 2 * CELL for x, y in drawn), (word, dy, dx)
                left, top = min(x for x, _ in drawn), min(y for _, y in drawn)
                width, height = max(x for x, _ in drawn) - left + 1, max(y for _, y in drawn) - top + 1
                assert (left % TEXT_GRID, top % TEXT_GRID) == (0, 0), (word, dy, dx)
                assert (width, height) == (GLYPH_SIZE[0] * len(word), GLYPH_SIZE[1]), (word, dy, dx)
                assert PLATE_COLOUR in {image.getpixel(point) for point in drawn}, (word, dy, dx)
                offsets.add((left, top))
    assert len(offsets) > 1, "the jitter never moved the word"


def test_matching_manifest_is_reused_and_a_different_one_refused(small_dataset):
    again = generate_synth(small_dataset.root, SMALL)
    assert again.manifest["cached"] is True
    with pytest.raises(DataError, match="not empty"):
        generate_synth(small_dataset.root, SynthConfig(n_train=41, n_heldout=10, seed=3))


def test_bad_config_is_refused():
    with pytest.raises(DataError, match="word_fraction"):
        SynthConfig(word_fraction=1.5)
