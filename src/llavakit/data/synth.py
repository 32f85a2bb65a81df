"""The built-in synthetic dataset: procedurally drawn scenes a tiny model can learn to see on a CPU in minutes.

A newcomer has no weights and no data, yet ``llavakit demo`` must show the real system learning to *see*. This
module draws small scenes (coloured shapes at grid positions, some wide or tall canvases, some with a short printed
word whose 8 px letters the base view squashes to 2-4 px, so the high-resolution tiles are what show them) and writes
them in the formats the rest of llavakit reads::

    OUT_DIR/
      images/train/NNNNN.png   images/heldout/NNNNN.png
      align.json        LLaVA captions for the align stage           [{"id", "image", "conversations"}]
      finetune.json     LLaVA instructions: single/multi-turn, text-only, multi-image samples
      heldout.jsonl     one QA record per line: question_id, image, question, answer, type
      manifest.json     seed, sizes, counts, version and the files written: a matching manifest means the
                        folder is reused; ``overwrite`` replaces exactly the files it lists

Image paths are relative to ``OUT_DIR``. Every answer is one canonical word (``red``, ``circle``, ``three``,
``left``, ``cat``), so exact-match scoring is meaningful. Training and held-out scenes come from two independent RNG
streams, and held-out images whose pixels equal a training image are redrawn, so nothing held out reaches training.
Generation is deterministic given the seed (Python's ``random.Random``; PNGs written by Pillow).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from llavakit.errors import DataError
from llavakit.io_safety import write_folder

SYNTH_VERSION = 5
MANIFEST_NAME = "manifest.json"
# The files next to images/, the manifest last.
DATA_FILES = ("align.json", "finetune.json", "heldout.jsonl", MANIFEST_NAME)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ("cat", "dog", "sun", "car", "box", "hat", "pen", "cup")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position", "word")
# (height, width) canvases: square, wide, tall. Cells are CELL px, so shapes sit on a 2x2, 2x4 or 4x2 grid.
CANVASES = ((64, 64), (64, 128), (128, 64))
CELL = 32
# Note: the background is CLIP's mean colour, which normalises to ~0. Background patches then carry little more
# than their position, and the shapes stand out: a random vision encoder passes their colour on strongly enough for
# a tiny model to learn from in minutes (a light background made every token look alike and learning stalled).
BACKGROUND = (123, 117, 104)
# A dark outline gives every shape the same edge pixels whatever its colour, so shape is not entangled with colour.
OUTLINE = (20, 20, 20)
OUTLINE_WIDTH = 2
# Note: white text is unlike every shape (coloured fill, dark outline), so the word's tokens are easy to tell from a
# shape's. Measured in otherwise equal demo runs: held-out shape accuracy 0.69 with black 11 px text, 0.92 with white
# 13 px text (black text looks like the shapes' outlines).
TEXT_COLOUR = (255, 255, 255)
# Note: words are printed like a label: bold letters on a dark plate, on a character grid of the encoder's 8 px
# patches. A random encoder trained for minutes has not learnt the shift-invariant glyph features a pretrained CLIP
# brings, so the letters must reach its tokens as strong, repeatable patterns. Measured (held-out word accuracy after
# 1200-1600 finetune steps, one run each; chance 0.125): thin 13 px text at any offset 0.09-0.19 in ~30 runs; thin
# letters on the grid 0.15; bold letters on the grid without the plate 0.11; on the plate 1.00.
TEXT_GRID = 8
# (width, height) of each letter: one patch wide and two tall, so a word is a 24x16 px plate in its 32 px cell. The
# base view squashes a canvas 2x or 4x into one tile, leaving letters 2-4 px wide: the AnyRes tiles are what read them.
GLYPH_SIZE = (8, 16)
PLATE_COLOUR = (20, 20, 20)
# Letters are drawn at this size with a 1 px stroke (bold), then squeezed into GLYPH_SIZE.
GLYPH_FONT_SIZE = 13
MAX_SHAPES = 4
SINGLE_SHAPE_FRACTION = 0.6
# Shape sides in pixels: most of a cell, so a shape covers several 8 px patches of its 32 px tile.
MIN_SIZE, MAX_SIZE = 20, 26


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        n_train: training scenes (each gives one caption and one instruction sample).
        n_heldout: held-out scenes (each gives one question per applicable type).
        seed: master seed; training and held-out use independent streams derived from it.
        word_fraction: share of scenes with a rendered word.
        multi_turn_fraction: share of training scenes whose instruction sample asks every question in turn.
        text_only_fraction, multi_image_fraction: extra finetune samples, as a share of ``n_train``.
    """

    n_train: int = 2000
    n_heldout: int = 120
    seed: int = 0
    word_fraction: float = 0.5
    multi_turn_fraction: float = 0.9
    text_only_fraction: float = 0.05
    multi_image_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.n_train < 2 or self.n_heldout < 1:
            raise DataError(f"synth: need n_train >= 2 and n_heldout >= 1, got {self.n_train} and {self.n_heldout}")
        for name in ("word_fraction", "multi_turn_fraction", "text_only_fraction", "multi_image_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"synth: {name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its kind, colour name, grid cell (row, col) and side in pixels."""

    kind: str
    colour: str
    row: int
    col: int
    size: int


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image and to ask questions about it."""

    height: int
    width: int
    shapes: tuple[Shape, ...]
    word: str | None
    word_cell: tuple[int, int] | None
    jitter: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class QA:
    """A question about one scene with its one-word answer and its type (one of `QUESTION_TYPES`)."""

    question: str
    answer: str
    type: str


@dataclass(frozen=True)
class SynthDataset:
    """Paths of a generated (or cached) synthetic dataset; image paths inside are relative to ``root``."""

    root: Path
    align_path: Path
    finetune_path: Path
    heldout_path: Path
    manifest: dict[str, Any]


def sample_scene(rng: random.Random, word_fraction: float = 0.5) -> Scene:
    """Draw a random scene: 1-4 shapes of distinct kinds and colours in distinct cells, and a word with
    probability ``word_fraction``."""
    height, width = rng.choice(CANVASES)
    cells = [(r, c) for r in range(height // CELL) for c in range(width // CELL)]
    rng.shuffle(cells)
    has_word = rng.random() < word_fraction
    # Most scenes hold one shape (the colour, shape and position questions), the rest 2-4 (count).
    n_shapes = 1 if rng.random() < SINGLE_SHAPE_FRACTION else rng.randint(2, min(MAX_SHAPES, len(cells) - int(has_word)))
    kinds = rng.sample(SHAPES, n_shapes)
    colours = rng.sample(sorted(COLOURS), n_shapes)
    shapes = tuple(
        Shape(kind, colour, row, col, rng.randint(MIN_SIZE, MAX_SIZE))
        for kind, colour, (row, col) in zip(kinds, colours, cells[:n_shapes])
    )
    word_cell = cells[n_shapes] if has_word else None
    jitter = tuple((rng.randint(-3, 3), rng.randint(-3, 3)) for _ in range(n_shapes + 1))
    return Scene(height, width, shapes, rng.choice(WORDS) if has_word else None, word_cell, jitter)


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` on an RGB canvas of ``(scene.height, scene.width)``."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, (dy, dx) in zip(scene.shapes, scene.jitter):
        centre_y = shape.row * CELL + CELL // 2 + dy
        centre_x = shape.col * CELL + CELL // 2 + dx
        _draw_shape(draw, shape.kind, COLOURS[shape.colour], centre_y, centre_x, shape.size)
    if scene.word is not None and scene.word_cell is not None:
        _draw_word(image, scene.word, scene.word_cell, scene.jitter[-1])
    return image


def _draw_word(image: Image.Image, word: str, cell: tuple[int, int], jitter: tuple[int, int]) -> None:
    """Print ``word`` in upper case on a dark plate inside ``cell``, its letters on the `TEXT_GRID`.

    The jitter picks one of the grid offsets that keep the plate inside the cell (the word shows in exactly one AnyRes
    tile): ``dx`` the column, ``dy`` the row.
    """
    glyph_w, glyph_h = GLYPH_SIZE
    width = glyph_w * len(word)
    columns, rows = (CELL - width) // TEXT_GRID + 1, (CELL - glyph_h) // TEXT_GRID + 1
    dy, dx = jitter
    left = cell[1] * CELL + TEXT_GRID * (dx % columns)
    top = cell[0] * CELL + TEXT_GRID * (dy % rows)
    ImageDraw.Draw(image).rectangle((left, top, left + width - 1, top + glyph_h - 1), fill=PLATE_COLOUR)
    for index, letter in enumerate(word.upper()):
        image.paste(TEXT_COLOUR, (left + index * glyph_w, top), _glyph_mask(letter))


@functools.cache
def _glyph_mask(letter: str) -> Image.Image:
    """An 8-bit mask of ``letter``: Pillow's default font, bold (1 px stroke), squeezed to `GLYPH_SIZE`."""
    font = ImageFont.load_default(size=GLYPH_FONT_SIZE)
    left, top, right, bottom = font.getbbox(letter, stroke_width=1)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), letter, fill=255, font=font, stroke_width=1, stroke_fill=255)
    return mask.resize(GLYPH_SIZE, Image.Resampling.BILINEAR)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, fill: tuple[int, int, int], cy: int, cx: int, size: int) -> None:
    half = size // 2
    box = (cx - half, cy - half, cx + half, cy + half)
    outline = {"fill": fill, "outline": OUTLINE, "width": OUTLINE_WIDTH}
    if kind == "circle":
        draw.ellipse(box, **outline)
    elif kind == "square":
        draw.rectangle(box, **outline)
    elif kind == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], **outline)
    elif kind == "cross":
        bar = max(3, size // 5)
        draw.polygon(_cross_points(cx, cy, half, bar), **outline)
    else:
        raise DataError(f"synth: unknown shape kind {kind!r}; known: {SHAPES}")


def _cross_points(cx: int, cy: int, half: int, bar: int) -> list[tuple[int, int]]:
    """The 12 corners of a plus sign centred at (cx, cy) with arms ``half`` long and ``2 * bar`` wide."""
    return [
        (cx - bar, cy - half), (cx + bar, cy - half), (cx + bar, cy - bar), (cx + half, cy - bar),
        (cx + half, cy + bar), (cx + bar, cy + bar), (cx + bar, cy + half), (cx - bar, cy + half),
        (cx - bar, cy + bar), (cx - half, cy + bar), (cx - half, cy - bar), (cx - bar, cy - bar),
    ]


def scene_questions(scene: Scene) -> list[QA]:
    """One question per applicable type, in `QUESTION_TYPES` order.

    Colour and shape questions are asked about single-shape scenes only. Asking for "the colour of the circle"
    among several shapes makes the LLM bind a named shape to its colour; measured on an earlier demo setup, that stayed at
    chance after 2000 steps (while counting reached 0.99), far beyond a 10-minute CPU budget. For the same reason the
    position question relates the two objects of a scene holding one shape and a word (see `_position_question`);
    the word question needs a word.
    """
    questions = []
    if len(scene.shapes) == 1:
        (shape,) = scene.shapes
        questions += [QA("What colour is the shape?", shape.colour, "colour"), QA("What shape is it?", shape.kind, "shape")]
    questions.append(QA("How many shapes are there?", NUMBERS[len(scene.shapes)], "count"))
    position = _position_question(scene)
    if position is not None:
        questions.append(position)
    if scene.word is not None:
        questions.append(QA("What word is written?", scene.word, "word"))
    return questions


def _position_question(scene: Scene) -> QA | None:
    """Where the lone shape is relative to the word: left/right when their columns differ, else above/below.

    Note: the question relates the only shape to the only word, so each is found without being named. Comparing two
    named shapes among several ("Is the red circle left or right of the blue square?") needs attention that the
    question steers to one shape, which the tiny from-scratch LLM never learnt within the CPU budget: at chance in
    every measured setup (2600 finetune steps; position-only finetunes of two-shape scenes up to 1500 steps). Even
    letting the question pick the subject ("Is the word left or right of the shape?" half the time) kept a 300-step
    position-only stage at chance, where this fixed form reached 0.90 in 200 steps.
    """
    if len(scene.shapes) != 1 or scene.word_cell is None:
        return None
    (shape,) = scene.shapes
    row, col = scene.word_cell
    # Note: horizontal when the columns differ; otherwise the rows differ (the word has a cell of its own).
    if shape.col != col:
        return QA("Is the shape left or right of the word?", "left" if shape.col < col else "right", "position")
    return QA("Is the shape above or below the word?", "above" if shape.row < row else "below", "position")


def scene_caption(scene: Scene) -> str:
    """A one-sentence description listing every shape and the word, e.g. ``"a red circle and a blue square."``."""
    parts = [f"a {shape.colour} {shape.kind}" for shape in scene.shapes]
    caption = " and ".join(parts) + "."
    if scene.word is not None:
        caption += f" the word {scene.word}."
    return caption


def _text_only_sample(rng: random.Random, sample_id: str) -> dict[str, Any]:
    """A conversation with no image: general knowledge about the dataset's own words."""
    index = rng.randrange(len(NUMBERS) - 1)
    facts = [
        ("How many sides does a triangle have?", "three"),
        ("How many sides does a square have?", "four"),
        ("Which shape is round?", "circle"),
        (f"What number comes after {NUMBERS[index]}?", NUMBERS[index + 1]),
        (f"Is {rng.choice(sorted(COLOURS))} a colour or a shape?", "colour"),
        (f"Is a {rng.choice(SHAPES)} a colour or a shape?", "shape"),
    ]
    question, answer = rng.choice(facts)
    return _conversation(sample_id, None, [(question, answer)])


def _conversation(sample_id: str, image: str | list[str] | None, turns: list[tuple[str, str]]) -> dict[str, Any]:
    """A LLaVA-format record; one ``<image>`` line per image opens the first human turn."""
    n_images = 0 if image is None else (len(image) if isinstance(image, list) else 1)
    conversations = []
    for index, (question, answer) in enumerate(turns):
        prefix = "<image>\n" * n_images if index == 0 else ""
        conversations.append({"from": "human", "value": prefix + question})
        conversations.append({"from": "gpt", "value": answer})
    record: dict[str, Any] = {"id": sample_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = conversations
    return record


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_scenes(
    root: Path, split: str, scenes_rng: random.Random, config: SynthConfig, count: int, forbidden: set[str]
) -> tuple[list[tuple[str, Scene]], set[str], int]:
    """Draw and write ``count`` scenes whose PNG hashes are not in ``forbidden``.

    Returns (relative path, scene) pairs, their hashes, and how many duplicates were redrawn.
    """
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Scene]] = []
    hashes: set[str] = set()
    redrawn = 0
    while len(written) < count:
        scene = sample_scene(scenes_rng, config.word_fraction)
        data = _png_bytes(render_scene(scene))
        digest = hashlib.sha256(data).hexdigest()
        if digest in forbidden or digest in hashes:
            redrawn += 1
            continue
        hashes.add(digest)
        relative = f"images/{split}/{len(written):05d}.png"
        (root / relative).write_bytes(data)
        written.append((relative, scene))
    return written, hashes, redrawn


def _finetune_records(train: list[tuple[str, Scene]], config: SynthConfig, rng: random.Random) -> list[dict[str, Any]]:
    """Instruction samples, plus text-only and two-image samples.

    Most scenes become one multi-turn conversation holding every applicable question (in random order): a turn
    costs ~10 text tokens against ~100 image tokens, so this multiplies the supervision per step. The rest are
    single-turn, so that first-turn questions of every type are common too.
    """
    records = []
    for index, (path, scene) in enumerate(train):
        questions = scene_questions(scene)
        rng.shuffle(questions)
        n_turns = len(questions) if rng.random() < config.multi_turn_fraction else 1
        turns = [(qa.question, qa.answer) for qa in questions[:n_turns]]
        records.append(_conversation(f"synth-ft-{index:05d}", path, turns))
    for index in range(round(config.text_only_fraction * config.n_train)):
        records.append(_text_only_sample(rng, f"synth-text-{index:05d}"))
    for index in range(round(config.multi_image_fraction * config.n_train)):
        (path_a, scene_a), (path_b, scene_b) = rng.sample(train, 2)
        which, scene = rng.choice((("first", scene_a), ("second", scene_b)))
        question = f"How many shapes are in the {which} image?"
        records.append(_conversation(f"synth-multi-{index:05d}", [path_a, path_b], [(question, NUMBERS[len(scene.shapes)])]))
    rng.shuffle(records)
    return records


def _heldout_records(heldout: list[tuple[str, Scene]]) -> list[dict[str, Any]]:
    records = []
    for index, (path, scene) in enumerate(heldout):
        for qa in scene_questions(scene):
            question_id = f"heldout-{index:05d}-{qa.type}"
            records.append({"question_id": question_id, "image": path, "question": qa.question, "answer": qa.answer, "type": qa.type})
    return records


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The folder's synthetic-dataset manifest; None when there is none or it is not one of ours."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "version" in manifest and "config" in manifest else None


def _manifest_files(manifest: dict[str, Any]) -> list[str]:
    """The files a manifest's generation wrote: its ``files`` list, or (manifests before the list) the fixed names
    that version wrote, from its counts."""
    if isinstance(manifest.get("files"), list):
        return [str(name) for name in manifest["files"]]
    counts = manifest.get("counts", {})
    return [
        *(f"images/train/{i:05d}.png" for i in range(int(counts.get("train_images", 0)))),
        *(f"images/heldout/{i:05d}.png" for i in range(int(counts.get("heldout_images", 0)))),
        *DATA_FILES,
    ]


def generate_synth(
    out_dir: str | Path, config: SynthConfig | None = None, overwrite: bool = False
) -> SynthDataset:
    """Generate the synthetic dataset into ``out_dir``, or reuse it when its manifest matches ``config``.

    The files are written into a partial folder next to ``out_dir`` and moved in at the end (`llavakit.io_safety`),
    so an error or interruption leaves ``out_dir`` as it was. ``manifest.json`` lists every file written: with
    ``overwrite``, exactly those files of the earlier dataset are replaced or deleted, nothing else in the folder.

    Args:
        out_dir: destination folder (created if missing).
        config: what to generate; defaults to `SynthConfig()`.
        overwrite: regenerate even when ``out_dir`` holds a synthetic dataset (a matching one, or one generated
            with another seed or sizes).

    Returns:
        The dataset's paths and manifest (``manifest["cached"]`` says whether it was reused).

    Raises:
        DataError: ``out_dir`` holds a different synthetic dataset and ``overwrite`` is False; it is a non-empty
            folder that holds no synthetic dataset (with or without ``overwrite``: nothing there is ours to
            replace); or a file the new dataset would write exists there without being listed in the manifest.
    """
    config = config or SynthConfig()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"synth: {root} is a file; choose a folder path for the dataset")
    previous = _read_manifest(root) if root.is_dir() else None
    if previous is not None and not overwrite and _same_dataset(previous, config):
        return _dataset(root, {**previous, "cached": True})
    if root.is_dir() and any(root.iterdir()):
        if previous is None:
            raise DataError(
                f"synth: {root} is not empty and holds no synthetic dataset (no llavakit {MANIFEST_NAME}); "
                "choose a new or empty folder (--overwrite only replaces a dataset this command wrote)"
            )
        if not overwrite:
            raise DataError(
                f"synth: {root} is not empty: it holds a synthetic dataset generated with {previous['config']}, not "
                f"{asdict(config)}; choose another folder, or pass overwrite=True (CLI: --overwrite) to replace "
                f"the files its {MANIFEST_NAME} lists (nothing else in the folder is touched)"
            )
    written: dict[str, Any] = {}
    owned = set(_manifest_files(previous)) if previous is not None else set()
    write_folder(
        root,
        lambda folder: written.update(_write_dataset(folder, config)),
        DataError,
        owned=lambda _: owned,
        replace_others=False,
        last=(MANIFEST_NAME,),
    )
    return _dataset(root, {**written, "cached": False})


def _same_dataset(manifest: dict[str, Any], config: SynthConfig) -> bool:
    return manifest.get("version") == SYNTH_VERSION and manifest.get("config") == asdict(config)


def _write_dataset(root: Path, config: SynthConfig) -> dict[str, Any]:
    """Draw and write the whole dataset into ``root`` (an empty folder); returns the manifest written."""
    # Contract: independent streams, so the held-out scenes never depend on (or repeat) the training draw.
    train_rng, heldout_rng, sample_rng = (random.Random(f"{config.seed}:{name}") for name in ("train", "heldout", "samples"))
    train, train_hashes, _ = _write_scenes(root, "train", train_rng, config, config.n_train, set())
    heldout, _, redrawn = _write_scenes(root, "heldout", heldout_rng, config, config.n_heldout, train_hashes)
    align = [_conversation(f"synth-cap-{i:05d}", path, [("Describe the image.", scene_caption(scene))]) for i, (path, scene) in enumerate(train)]
    finetune = _finetune_records(train, config, sample_rng)
    heldout_qa = _heldout_records(heldout)
    (root / "align.json").write_text(json.dumps(align, indent=1))
    (root / "finetune.json").write_text(json.dumps(finetune, indent=1))
    (root / "heldout.jsonl").write_text("".join(json.dumps(record) + "\n" for record in heldout_qa))
    files = [path for path, _ in train + heldout] + list(DATA_FILES)
    manifest = {
        "version": SYNTH_VERSION,
        "config": asdict(config),
        "counts": {
            "train_images": len(train),
            "heldout_images": len(heldout),
            "align_samples": len(align),
            "finetune_samples": len(finetune),
            "heldout_questions": len(heldout_qa),
            "heldout_redrawn_duplicates": redrawn,
        },
        "files": files,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def _dataset(root: Path, manifest: dict[str, Any]) -> SynthDataset:
    """The dataset's paths; its manifest without the file list (thousands of names no report needs)."""
    summary = {key: value for key, value in manifest.items() if key != "files"}
    return SynthDataset(root, root / "align.json", root / "finetune.json", root / "heldout.jsonl", summary)


def training_corpus(dataset: SynthDataset) -> list[str]:
    """Every text of the dataset (questions, answers, captions), e.g. to train the demo tokenizer on it."""
    texts: list[str] = []
    for path in (dataset.align_path, dataset.finetune_path):
        for record in json.loads(path.read_text()):
            texts.extend(turn["value"].replace("<image>", "") for turn in record["conversations"])
    return texts
