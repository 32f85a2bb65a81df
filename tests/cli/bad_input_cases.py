"""The bad-input tour: bad inputs and faults a new user would try, each run through the ``llavakit`` CLI in process.

Each `Case` builds its bad input under a fresh folder, runs ``llavakit.cli.main.main(argv)`` and states what a good
answer looks like: the exit code (2 for a user error, 1 for a data report that fails, 0 where the input is accepted
by design) and substrings of the message that name what is wrong (file, line, field) or the fix. The table is shared
by ``tests/cli/test_cli_bad_input_tour.py`` (which asserts every case) and ``scripts/bad_input_tour.py`` (which
writes ``docs/bad-inputs.md`` from the same runs), so the published list is the tested one.

Shared, read-only inputs (a tiny checkpoint, its parts, a small synthetic dataset) are built once by `build_shared`
or taken from the test session's fixtures; a case that needs a broken copy makes it under its own folder. A case
that still fails names, in ``known``, the file where the fix belongs: the test expects it to fail (strictly, so
the mark goes once it is fixed) and the doc lists it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import struct
import sys
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

CATEGORIES = ("data", "checkpoint", "cli", "training", "chat", "convert", "serve")
TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class Shared:
    """Inputs every case may read but none may change.

    Attributes:
        checkpoint: a saved tiny ``debug-clip-llama`` checkpoint folder (also a tokenizer folder for inspect).
        vision, llm: the preset's part folders.
        synth_root: a small synthetic dataset (``finetune.json``, ``align.json``, ``images/``).
    """

    checkpoint: Path
    vision: Path
    llm: Path
    synth_root: Path


@dataclass(frozen=True)
class Workspace:
    """Where one case runs: its own empty folder plus the shared inputs."""

    root: Path
    shared: Shared

    @property
    def checkpoint(self) -> Path:
        return self.shared.checkpoint


@dataclass(frozen=True)
class Case:
    """One bad input or fault.

    Attributes:
        id: unique, short, kebab-case.
        category: one of `CATEGORIES`.
        what: the input in words (the doc's "input" column).
        setup: builds the bad input under ``ws.root`` and returns the argv after ``llavakit``.
        expect: substrings the output (stdout + stderr) must hold; ``{root}`` is replaced by the case's folder.
        code: the expected exit code.
        stdin: text fed to the command's standard input (chat questions).
        forbid: substrings the output must not hold (bad advice).
        check: extra assertions after the run (nothing executed, input intact, nothing exported).
        known: for a case that still fails, the file whose owner is to fix it (the test expects the failure).
    """

    id: str
    category: str
    what: str
    setup: Callable[[Workspace], list[str]]
    expect: tuple[str, ...]
    code: int = 2
    stdin: str = ""
    forbid: tuple[str, ...] = ()
    check: Callable[[Workspace], None] | None = None
    known: str = ""


@dataclass
class Outcome:
    """What one run printed and returned (``code`` None: an exception escaped ``main``)."""

    code: int | None
    out: str
    err: str
    escaped: str = ""

    @property
    def text(self) -> str:
        return self.out + self.err + self.escaped

    def first_line(self) -> str:
        """llavakit's message: the escaped exception, the first ``error:`` line, an inspect report's verdict and
        first example, or (for accepted inputs) the first line printed."""
        if self.escaped:
            return self.escaped.strip().splitlines()[-1]
        out = [line.strip() for line in self.out.splitlines() if line.strip()]
        errors = [line.strip() for line in self.err.splitlines() if "error:" in line]
        errors += [line for line in out if line.startswith("error:")]
        if errors:
            return errors[0]
        verdict = next((line for line in out if line.startswith(("PASS", "FAIL"))), None)
        example = next((line for line in out if line.startswith("e.g. ")), None)
        detail = example or next((line for line in out if line.startswith("images: only headers")), None)
        if verdict and detail:
            return f"{verdict} — {detail}"
        return verdict or (out[0] if out else "")


# --- running ------------------------------------------------------------------------------------------------------


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Build the case's input and run ``llavakit ARGV`` in process; nothing the command raises escapes."""
    from llavakit.cli.main import main

    ws.root.mkdir(parents=True, exist_ok=True)
    argv = case.setup(ws)
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(case.stdin)
    escaped = ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: int | None = main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # noqa: BLE001 - the tour records whatever escapes
                code, escaped = None, traceback.format_exc()
    finally:
        sys.stdin = saved_stdin
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def quiet(argv: list[str]) -> int:
    """Run ``llavakit ARGV`` for a case's setup (an earlier run), its output dropped."""
    from llavakit.cli.main import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def build_shared(root: Path, parts: Any = None, checkpoint: Path | None = None) -> Shared:
    """The shared inputs under ``root``; ``parts`` (`PresetParts` of ``debug-clip-llama``) and ``checkpoint`` (saved
    from them) are reused when given, e.g. from the test session's fixtures."""
    from llavakit.data.synth import SynthConfig, generate_synth
    from llavakit.model.llava_next import LlavaNextModel
    from llavakit.model.presets import build_parts

    parts = parts or build_parts("debug-clip-llama", root / "parts")
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = LlavaNextModel.from_parts(**parts.from_parts_kwargs()).save_pretrained(
            root / "checkpoint"
        )
    synth = generate_synth(root / "synth", SynthConfig(n_train=8, n_heldout=1))
    return Shared(Path(checkpoint), Path(parts.vision_dir), Path(parts.llm_dir), synth.root)


# --- building bad inputs --------------------------------------------------------------------------------------------


class PlantedPayload:
    """Unpickling this creates the file ``marker``: the stand-in for any code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def evil_pickle(path: Path, ws: Workspace) -> Path:
    """A ``torch.save`` file whose loading with ``weights_only=False`` would create ``ws.root/pwned``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model.mm_projector.0.weight": PlantedPayload(ws.root / "pwned")}, path)
    return path


def nothing_executed(ws: Workspace) -> None:
    assert not (ws.root / "pwned").exists(), "the planted pickle payload ran"
    planted = next(path for pattern in ("*.bin", "rank-*.pt") for path in ws.root.rglob(pattern))
    torch.load(planted, weights_only=False)  # noqa: S614 - proves the payload is live
    assert (ws.root / "pwned").exists(), "the planted payload is inert: the case proves nothing"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width``×``height`` (no memory spent on the pixels it claims)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def truncated_png(path: Path) -> Path:
    """A noise PNG (incompressible) cut in half: its header reads, its pixels do not."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def sample(*texts: str, image: Any = None, sample_id: str = "s") -> dict[str, Any]:
    """A LLaVA sample whose turns alternate human/gpt."""
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]
    record: dict[str, Any] = {"id": sample_id, "conversations": turns}
    if image is not None:
        record["image"] = image
    return record


def two_samples() -> list[dict[str, Any]]:
    return [
        sample("<image>\nWhat colour?", "Red.", image="a.png", sample_id="a"),
        sample("Hi", "Hello.", sample_id="b"),
    ]


def data_file(ws: Workspace, content: str | bytes | list, name: str = "data.json") -> Path:
    """``ws.root/name`` holding ``content`` (a list is written as indented JSON); images a.png, b.png beside it."""
    path = ws.root / name
    if isinstance(content, list):
        content = json.dumps(content, indent=1)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    image(ws.root / "img" / "a.png")
    return path


def inspect(ws: Workspace, data: Path, *extra: str) -> list[str]:
    """``data inspect`` with the shared checkpoint as tokenizer and image spec, images under ``ws.root/img``."""
    checkpoint = ws.checkpoint
    return [
        "data", "inspect", str(data), "--image-folder", str(ws.root / "img"), "--tokenizer", str(checkpoint),
        "--image-spec", str(checkpoint / "config.json"), *extra,
    ]  # fmt: skip


def inspect_samples(ws: Workspace, samples: list, *extra: str) -> list[str]:
    return inspect(ws, data_file(ws, samples), *extra)


def with_image(ws: Workspace, make: Callable[[Path], Path], name: str) -> list[dict[str, Any]]:
    """One sample about ``ws.root/img/<name>`` built by ``make``, plus a text sample."""
    make(ws.root / "img" / name)
    return [
        sample("<image>\nDescribe.", "A thing.", image=name, sample_id="bad-image"),
        sample("Hi", "Hello."),
    ]


def run_config(ws: Workspace, stage: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A one-stage debug run on the shared synthetic data (1 step, batch 2), ``stage``/``top`` merged in."""
    synth = ws.shared.synth_root
    base_stage = {
        "name": "finetune",
        "trainable": ["projector", "language_model"],
        "data": {"path": str(synth / "finetune.json"), "image_folder": str(synth), "max_length": 512},
        "global_batch_size": 2,
        "micro_batch_size": 2,
        "max_steps": 1,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
    }
    config = {
        "run_dir": str(ws.root / "run"),
        "model": {"preset": "debug-clip-llama"},
        "stages": [merge(base_stage, stage or {})],
        "logging": {"report_to": "none", "progress_bar": False},
    }
    return merge(config, top)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def train(
    ws: Workspace, stage: dict[str, Any] | None = None, *overrides: str, model: dict | None = None, **top: Any
) -> list[str]:
    """``train --config run.yaml OVERRIDES`` for `run_config` (``model`` replaces the preset section)."""
    config = run_config(ws, stage, **top)
    config["model"] = model or config["model"]
    path = ws.root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["train", "--config", str(path), *overrides]


def train_on(ws: Workspace, samples: list | str | bytes, name: str = "data.json", **stage: Any) -> list[str]:
    """A debug run whose data is ``samples`` (images under ``ws.root/img``)."""
    path = data_file(ws, samples, name)
    return train(ws, merge({"data": {"path": str(path), "image_folder": str(ws.root / "img")}}, stage))


def checkpoint_copy(ws: Workspace, edit: Callable[[Path], None] = lambda _: None) -> Path:
    """A copy of the shared checkpoint under ``ws.root/ckpt``, changed by ``edit``."""
    path = shutil.copytree(ws.checkpoint, ws.root / "ckpt")
    edit(Path(path))
    return Path(path)


def write_config(value: Any) -> Callable[[Path], None]:
    return lambda path: (path / "config.json").write_text(
        value if isinstance(value, str) else json.dumps(value)
    )


def cut_file(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return edit


def chat(ws: Workspace, *extra: str, model: Path | None = None) -> list[str]:
    return [
        "chat",
        "--model",
        str(model or ws.checkpoint),
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
        *extra,
    ]


def serve(ws: Workspace, *extra: str) -> list[str]:
    return ["serve", "--model", f"tiny={ws.checkpoint}", "--device", "cpu", "--port", "0", *extra]


def build(ws: Workspace, *extra: str, vision: str | None = None, llm: str | None = None) -> list[str]:
    return [
        "model", "build", "--vision", vision or str(ws.shared.vision), "--llm", llm or str(ws.shared.llm),
        "--out", str(ws.root / "built"), *extra,
    ]  # fmt: skip


def upstream(ws: Workspace, *extra: str) -> list[str]:
    """``train`` with upstream ``train_mem.py`` flags (a LLaVA-1.5-style finetune command line)."""
    return [
        "train", "--model_name_or_path", "lmsys/vicuna-7b-v1.5", "--vision_tower", "openai/clip-vit-large-patch14-336",
        "--data_path", str(ws.shared.synth_root / "finetune.json"), "--image_folder", str(ws.shared.synth_root),
        "--output_dir", str(ws.root / "out"), *extra,
    ]  # fmt: skip


def finished_then_changed(ws: Workspace) -> list[str]:
    """A finished 1-step run, then the same run_dir with another learning rate."""
    assert quiet(train(ws)) == 0
    return train(ws, {"optim": {"lr": 5e-4}})


def killed_then_resumed(ws: Workspace) -> list[str]:
    """A 3-step run checkpointing every step, put back to where a kill after step 2's metrics line (before its
    checkpoint) and before the export would have left it; the case re-runs it, which resumes from step 1."""
    argv = train(ws, {"max_steps": 3}, logging={"save_every": 1})
    assert quiet(argv) == 0
    stage = ws.root / "run" / "finetune"
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "step-000002")
    lines = (stage / "metrics.jsonl").read_text().splitlines(keepends=True)
    (stage / "metrics.jsonl").write_text("".join(lines[:2]))
    return argv


def resume_from_planted_pickle(ws: Workspace) -> list[str]:
    """A run whose newest checkpoint holds a malicious pickled ``rank-00000.pt`` (the pre-safetensors format) in
    place of its rank state; the case resumes it."""
    argv = train(ws, {"max_steps": 2}, logging={"save_every": 1})
    assert quiet(argv) == 0
    stage = ws.root / "run" / "finetune"
    shutil.rmtree(stage / "final")  # killed before the export: resume starts from step 1's checkpoint
    rank = stage / "checkpoints" / "step-000001" / "rank-00000"
    rank.with_suffix(".json").unlink()
    rank.with_suffix(".safetensors").unlink()
    evil_pickle(rank.with_name("payload.bin"), ws).rename(rank.with_suffix(".pt"))
    return argv


def metrics_steps_unique(ws: Workspace) -> None:
    metrics = (ws.root / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics if '"step"' in line]
    assert steps == [1, 2, 3], f"metrics.jsonl steps after the resume: {steps}"


def not_exported(ws: Workspace) -> None:
    assert not (ws.root / "run" / "finetune" / "final").exists(), "a final model was exported"


def unchanged_checkpoint(ws: Workspace) -> None:
    assert (ws.root / "ckpt" / "config.json").read_bytes() == (ws.checkpoint / "config.json").read_bytes()
    assert sorted(p.name for p in (ws.root / "ckpt").iterdir()) == sorted(
        p.name for p in ws.checkpoint.iterdir()
    )


def foreign_folder(ws: Workspace) -> Path:
    """A user's own folder holding ``images/`` and ``finetune.json`` that llavakit did not write."""
    folder = ws.root / "mine"
    image(folder / "images" / "holiday.png")
    (folder / "finetune.json").write_text("[]")
    return folder


def foreign_folder_intact(ws: Workspace) -> None:
    assert (ws.root / "mine" / "images" / "holiday.png").is_file()
    assert (ws.root / "mine" / "finetune.json").read_text() == "[]"


def unwritable_run_dir(ws: Workspace) -> list[str]:
    blocker = ws.root / "a-file"
    blocker.write_text("")
    return train(ws, run_dir=str(blocker / "run"))


def upstream_lora_folder(ws: Workspace) -> Path:
    """An upstream ``--lora_enable`` output folder whose ``adapter_model.bin`` is a malicious pickle."""
    folder = ws.root / "lora"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_llama", "hidden_size": 64}))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    evil_pickle(folder / "adapter_model.bin", ws)
    return folder


def original_folder(ws: Workspace) -> Path:
    """An original-layout LLaVA folder whose ``pytorch_model.bin`` is a malicious pickle."""
    folder = ws.root / "original"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_llama", "hidden_size": 64}))
    evil_pickle(folder / "pytorch_model.bin", ws)
    return folder


def text_file(path: Path, text: str = "not pixels") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mixture(ws: Workspace, text: str | bytes) -> Path:
    path = ws.root / "mix.yaml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    image(ws.root / "img" / "a.png")
    return path


def two_samples_json(cut: int = 0, tail: str = "") -> str:
    text = json.dumps(two_samples(), indent=1)
    return text[: len(text) - cut] + tail


LATIN1 = json.dumps([sample("Où est le café ?", "Là.")], ensure_ascii=False, indent=1).encode("latin-1")
LATIN1_JSONL = (json.dumps(sample("Où est le café ?", "Là."), ensure_ascii=False) + "\n").encode("latin-1")
# A prompt longer than the tiny model's context (4096 tokens): one word is at least one token.
LONG_PROMPT = "word " * 4200 + "\n"


def _c(
    id: str, category: str, what: str, setup: Callable[[Workspace], list[str]], *expect: str, **kw: Any
) -> Case:
    return Case(id, category, what, setup, tuple(expect), **kw)


# --- the table ------------------------------------------------------------------------------------------------------

DATA_CASES = [
    _c(
        "data-file-missing",
        "data",
        "`data inspect` of a data file that does not exist",
        lambda ws: inspect(ws, data_file(ws, two_samples()).with_name("nope.json")),
        "nope.json",
        "does not exist",
    ),
    _c(
        "data-latin1-json",
        "data",
        "a Latin-1 encoded .json data file",
        lambda ws: inspect(ws, data_file(ws, LATIN1)),
        "data.json",
        "UTF-8",
    ),
    _c(
        "data-latin1-jsonl",
        "data",
        "a Latin-1 encoded .jsonl data file",
        lambda ws: inspect(ws, data_file(ws, LATIN1_JSONL, "data.jsonl")),
        "data.jsonl:1",
        "UTF-8",
    ),
    _c(
        "data-truncated-array",
        "data",
        "a JSON list cut after a complete sample (no closing `]`)",
        lambda ws: inspect(ws, data_file(ws, two_samples_json(cut=1))),
        "data.json:",
        "no closing ']'",
    ),
    _c(
        "data-trailing-garbage",
        "data",
        "text after the closing `]` of a JSON list",
        lambda ws: inspect(ws, data_file(ws, two_samples_json(tail="\ngarbage\n"))),
        "data.json:",
        "unexpected text after the closing ']'",
    ),
    _c(
        "data-cut-inside-sample",
        "data",
        "a JSON list cut in the middle of a sample",
        lambda ws: inspect(ws, data_file(ws, two_samples_json(cut=40))),
        "data.json:",
        "malformed JSON",
    ),
    _c(
        "data-top-level-object",
        "data",
        "a .json file holding one object instead of a list",
        lambda ws: inspect(ws, data_file(ws, json.dumps(two_samples()[0]))),
        "data.json",
        "list",
    ),
    _c(
        "data-empty-file",
        "data",
        "an empty (0-byte) .json file",
        lambda ws: inspect(ws, data_file(ws, "")),
        "data.json",
        "empty",
    ),
    _c(
        "data-empty-list",
        "data",
        "a .json file holding `[]`",
        lambda ws: inspect(ws, data_file(ws, "[]")),
        "data.json holds no samples",
        code=1,
    ),
    _c(
        "data-jsonl-bad-line",
        "data",
        "a .jsonl file whose second line is broken JSON",
        lambda ws: inspect(ws, data_file(ws, json.dumps(two_samples()[1]) + "\n{broken\n", "data.jsonl")),
        "data.jsonl:2",
        "malformed JSON",
        code=1,
    ),
    _c(
        "data-no-conversations",
        "data",
        "a sample without a `conversations` field",
        lambda ws: inspect_samples(ws, [{"id": "x"}, sample("Hi", "Hello.")]),
        "'x'",
        "conversations",
        code=1,
    ),
    _c(
        "data-conversations-not-list",
        "data",
        "`conversations` is a string",
        lambda ws: inspect_samples(ws, [{"id": "x", "conversations": "Hi"}, sample("Hi", "Hello.")]),
        "'x'",
        "conversations",
        code=1,
    ),
    _c(
        "data-unknown-role",
        "data",
        "a turn `from: robot`",
        lambda ws: inspect_samples(ws, [{"id": "x", "conversations": [{"from": "robot", "value": "Hi"}]}]),
        "'x'",
        "robot",
        code=1,
    ),
    _c(
        "data-value-not-string",
        "data",
        "a turn whose `value` is a number",
        lambda ws: inspect_samples(ws, [{"id": "x", "conversations": [{"from": "human", "value": 5}]}]),
        "'x'",
        "value",
        code=1,
    ),
    _c(
        "data-placeholder-mismatch",
        "data",
        "two `<image>` placeholders for one image",
        lambda ws: inspect_samples(ws, [sample("<image><image>\nHi", "Yo.", image="a.png", sample_id="x")]),
        "'x'",
        "<image>",
        code=1,
    ),
    _c(
        "data-image-missing",
        "data",
        "a sample whose image file does not exist",
        lambda ws: inspect_samples(ws, [sample("<image>\nHi", "Yo.", image="gone.png", sample_id="x")]),
        "'x'",
        "gone.png",
        "--image-folder",
        code=1,
    ),
    _c(
        "data-image-not-an-image",
        "data",
        "a text file named `.png`",
        lambda ws: inspect_samples(ws, with_image(ws, text_file, "notes.png")),
        "'bad-image'",
        "notes.png",
        code=1,
    ),
    _c(
        "data-image-is-a-folder",
        "data",
        "an `image` path that is a folder",
        lambda ws: inspect_samples(ws, with_image(ws, lambda p: (p.mkdir(parents=True), p)[1], "dir.png")),
        "'bad-image'",
        "dir.png",
        code=1,
    ),
    _c(
        "data-image-bomb",
        "data",
        "a 20000×20000 image (PIL decompression bomb) in `data inspect`",
        lambda ws: inspect_samples(ws, with_image(ws, lambda p: png_header_only(p, 20000, 20000), "big.png")),
        "big.png",
        "400000000 pixels",
        code=1,
    ),
    _c(
        "data-image-81mp",
        "data",
        "a 9000×9000 (81 MP) image",
        lambda ws: inspect_samples(ws, with_image(ws, lambda p: png_header_only(p, 9000, 9000), "big.png")),
        "big.png",
        "81000000 pixels",
        code=1,
    ),
    _c(
        "data-image-1x1",
        "data",
        "a 1×1 image",
        lambda ws: inspect_samples(ws, with_image(ws, lambda p: image(p, 1, 1), "dot.png")),
        "dot.png",
        "below 2 px",
        code=1,
    ),
    _c(
        "data-image-truncated-decode",
        "data",
        "a truncated PNG, `data inspect --decode`",
        lambda ws: inspect_samples(
            ws, with_image(ws, truncated_png, "cut.png"), "--decode", "--workers", "1"
        ),
        "cut.png",
        "corrupt or truncated",
        code=1,
    ),
    _c(
        "data-image-truncated-headers",
        "data",
        "a truncated PNG, `data inspect` without `--decode`",
        lambda ws: inspect_samples(ws, with_image(ws, truncated_png, "cut.png")),
        "only headers were checked",
        "--decode",
        code=0,
    ),
    _c(
        "data-image-folder-missing",
        "data",
        "`--image-folder` that does not exist",
        lambda ws: [
            *inspect(ws, data_file(ws, two_samples()))[:4],
            str(ws.root / "no-such-folder"),
            *inspect(ws, ws.root / "data.json")[5:],
        ],
        "no-such-folder",
    ),
    _c(
        "data-tokenizer-missing",
        "data",
        "`--tokenizer` folder that does not exist",
        lambda ws: [
            *inspect(ws, data_file(ws, two_samples()))[:6],
            str(ws.root / "no-tok"),
            *inspect(ws, ws.root / "data.json")[7:],
        ],
        "no-tok",
    ),
    _c(
        "data-template-unknown",
        "data",
        "`--template vicuna` (not a template id)",
        lambda ws: inspect(ws, data_file(ws, two_samples()), "--template", "vicuna"),
        "'vicuna'",
        "vicuna_v1",
    ),
    _c(
        "data-image-spec-missing",
        "data",
        "`--image-spec` file that does not exist",
        lambda ws: inspect(ws, data_file(ws, two_samples()))[:-1] + [str(ws.root / "spec.json")],
        "spec.json",
    ),
    _c(
        "data-image-spec-bad-json",
        "data",
        "`--image-spec` file holding broken JSON",
        lambda ws: (
            inspect(ws, data_file(ws, two_samples()))[:-1] + [str(text_file(ws.root / "spec.json", "{"))]
        ),
        "spec.json",
    ),
    _c(
        "data-max-error-fraction",
        "data",
        "`--max-error-fraction 2`",
        lambda ws: inspect(ws, data_file(ws, two_samples()), "--max-error-fraction", "2"),
        "max-error-fraction",
    ),
    _c(
        "data-workers-zero",
        "data",
        "`--decode --workers 0`",
        lambda ws: inspect(ws, data_file(ws, two_samples()), "--decode", "--workers", "0"),
        "--workers 0",
    ),
    _c(
        "data-max-length-too-small",
        "data",
        "`--model-max-length 16`: every image sample is cut through its image",
        lambda ws: inspect_samples(
            ws,
            [sample("<image>\nColour?", "Red.", image="a.png", sample_id="a")] * 2,
            "--model-max-length",
            "16",
        ),
        "sample 'a'",
        "model_max_length=16",
        code=1,
    ),
    _c(
        "data-mixture-missing-json",
        "data",
        "a YAML mixture naming a JSON file that does not exist",
        lambda ws: inspect(ws, mixture(ws, "datasets:\n  - json_path: gone.json\n")),
        "gone.json",
    ),
    _c(
        "data-mixture-bad-yaml",
        "data",
        "a YAML mixture with broken syntax",
        lambda ws: inspect(ws, mixture(ws, "datasets: [\n")),
        "mix.yaml",
    ),
    _c(
        "data-mixture-latin1",
        "data",
        "a Latin-1 encoded YAML mixture",
        lambda ws: inspect(ws, mixture(ws, "datasets:\n  - json_path: caf\xe9.json\n".encode("latin-1"))),
        "mix.yaml",
        "UTF-8",
    ),
    _c(
        "data-literal-eos",
        "data",
        "a literal `</s>` and `<s>` in sample text (ordinary text by design)",
        lambda ws: inspect_samples(ws, [sample("Say </s> and <s>.", "Done </s> here.")]),
        "PASS",
        code=0,
    ),
    _c(
        "data-path-is-folder",
        "data",
        "`data inspect` of a folder instead of a data file",
        lambda ws: inspect(ws, data_file(ws, two_samples()).parent),
        "{root} is a folder",
    ),
    _c(
        "data-synth-foreign-overwrite",
        "data",
        "`data synth OUT --overwrite` on a folder llavakit did not write",
        lambda ws: ["data", "synth", str(foreign_folder(ws)), "--n", "2", "--heldout", "1", "--overwrite"],
        "mine",
        "synthetic dataset",
        check=foreign_folder_intact,
    ),
    _c(
        "data-synth-foreign",
        "data",
        "`data synth OUT` on a folder llavakit did not write (no flag)",
        lambda ws: ["data", "synth", str(foreign_folder(ws)), "--n", "2", "--heldout", "1"],
        "mine",
        "synthetic dataset",
        forbid=("pass --overwrite",),
        check=foreign_folder_intact,
    ),
    _c(
        "data-synth-out-is-file",
        "data",
        "`data synth OUT` where OUT is a file",
        lambda ws: ["data", "synth", str(text_file(ws.root / "out")), "--n", "2"],
        "is a file",
    ),
    _c(
        "data-synth-negative-n",
        "data",
        "`data synth OUT --n -1`",
        lambda ws: ["data", "synth", str(ws.root / "out"), "--n", "-1"],
        "--n -1",
    ),
]

CHECKPOINT_CASES = [
    _c(
        "ckpt-info-missing",
        "checkpoint",
        "`model info` of a folder that does not exist",
        lambda ws: ["model", "info", str(ws.root / "nope")],
        "nope",
        "config.json is missing",
    ),
    _c(
        "ckpt-info-file",
        "checkpoint",
        "`model info` of a file, not a folder",
        lambda ws: ["model", "info", str(text_file(ws.root / "model.txt"))],
        "model.txt",
    ),
    _c(
        "ckpt-config-list",
        "checkpoint",
        "a `config.json` holding a JSON list",
        lambda ws: ["model", "info", str(checkpoint_copy(ws, write_config([1, 2])))],
        "config.json",
        "expected a JSON object",
    ),
    _c(
        "ckpt-config-bad-json",
        "checkpoint",
        "a `config.json` with broken JSON",
        lambda ws: ["model", "info", str(checkpoint_copy(ws, write_config("{")))],
        "config.json",
        "invalid JSON",
    ),
    _c(
        "ckpt-config-foreign-type",
        "checkpoint",
        "a `config.json` of another architecture (`model_type: bert`)",
        lambda ws: ["model", "info", str(checkpoint_copy(ws, write_config({"model_type": "bert"})))],
        "bert",
    ),
    _c(
        "ckpt-weights-missing",
        "checkpoint",
        "a checkpoint folder without `model.safetensors` (chat)",
        lambda ws: chat(ws, model=checkpoint_copy(ws, lambda p: (p / "model.safetensors").unlink())),
        "model.safetensors",
    ),
    _c(
        "ckpt-weights-truncated",
        "checkpoint",
        "a truncated `model.safetensors` (chat)",
        lambda ws: chat(ws, model=checkpoint_copy(ws, cut_file("model.safetensors"))),
        "model.safetensors",
    ),
    _c(
        "ckpt-tokenizer-missing",
        "checkpoint",
        "a checkpoint folder without its tokenizer files (chat)",
        lambda ws: chat(ws, model=checkpoint_copy(ws, lambda p: [f.unlink() for f in p.glob("tokenizer*")])),
        "ckpt holds no tokenizer files",
    ),
    _c(
        "ckpt-evil-bin-in-checkpoint",
        "checkpoint",
        "a checkpoint whose weights are a malicious `pytorch_model.bin` (chat)",
        lambda ws: chat(
            ws,
            model=checkpoint_copy(
                ws, lambda p: ((p / "model.safetensors").unlink(), evil_pickle(p / "pytorch_model.bin", ws))
            ),
        ),
        "model.safetensors",
        forbid=("weights_only=False",),
        check=nothing_executed,
    ),
    _c(
        "ckpt-evil-projector-bin",
        "checkpoint",
        "a malicious pickle as `model.pretrained_projector` (`mm_projector.bin`) in `train`",
        lambda ws: train(
            ws, None, f"model.pretrained_projector={evil_pickle(ws.root / 'mm_projector.bin', ws)}"
        ),
        "mm_projector.bin",
        "refused",
        forbid=("weights_only=False",),
        check=nothing_executed,
    ),
    _c(
        "ckpt-evil-original-bin",
        "checkpoint",
        "`convert from-original` of a folder whose `pytorch_model.bin` is a malicious pickle",
        lambda ws: ["convert", "from-original", str(original_folder(ws)), str(ws.root / "out")],
        "pytorch_model.bin",
        "refused",
        forbid=("weights_only=False",),
        check=nothing_executed,
    ),
    _c(
        "ckpt-evil-lora-bin",
        "checkpoint",
        "`convert from-upstream-lora` whose `adapter_model.bin` is a malicious pickle",
        lambda ws: [
            "convert",
            "from-upstream-lora",
            str(upstream_lora_folder(ws)),
            "--model-base",
            str(ws.shared.llm),
            "--out",
            str(ws.root / "out"),
        ],
        "adapter_model.bin",
        "refused",
        forbid=("weights_only=False",),
        check=nothing_executed,
    ),
    _c(
        "build-vision-missing",
        "checkpoint",
        "`model build` with a vision folder that does not exist",
        lambda ws: build(ws, vision=str(ws.root / "no-vision")),
        "--vision",
        "no-vision does not exist",
    ),
    _c(
        "build-llm-missing",
        "checkpoint",
        "`model build` with an LLM folder that does not exist",
        lambda ws: build(ws, llm=str(ws.root / "no-llm")),
        "--llm",
        "no-llm does not exist",
    ),
    _c(
        "build-vision-not-a-model",
        "checkpoint",
        "`model build --vision` pointing at an empty folder",
        lambda ws: build(ws, vision=str((ws.root / "empty").mkdir() or ws.root / "empty")),
        "--vision",
        "no config.json",
    ),
    _c(
        "build-hub-id-offline",
        "checkpoint",
        "`model build --llm owner/name` for a Hub model not downloaded (offline)",
        lambda ws: build(ws, llm="nobody/no-such-llm"),
        "--llm nobody/no-such-llm cannot be loaded",
    ),
    _c(
        "build-vision-is-llm",
        "checkpoint",
        "`model build --vision` pointing at the LLM folder",
        lambda ws: build(ws, vision=str(ws.shared.llm)),
        "--vision",
        "'llama' model, not a vision encoder",
    ),
    _c(
        "build-bad-projector",
        "checkpoint",
        "`model build --projector mlp2x_relu`",
        lambda ws: build(ws, "--projector", "mlp2x_relu"),
        "mlp2x_relu",
    ),
    _c(
        "build-bad-pinpoints",
        "checkpoint",
        "`model build --pinpoints '(1x)'`",
        lambda ws: build(ws, "--pinpoints", "(1x)"),
        "(1x)",
    ),
    _c(
        "build-bad-aspect",
        "checkpoint",
        "`model build --aspect-ratio squashed`",
        lambda ws: build(ws, "--aspect-ratio", "squashed"),
        "squashed",
    ),
    _c(
        "build-bad-template",
        "checkpoint",
        "`model build --template vicuna`",
        lambda ws: build(ws, "--template", "vicuna"),
        "'vicuna'",
    ),
    _c(
        "build-out-is-input",
        "checkpoint",
        "`model build --out` equal to the `--llm` folder",
        lambda ws: build(ws)[:-1] + [str(ws.shared.llm)],
        "is the input",
    ),
    _c(
        "build-out-foreign-checkpoint",
        "checkpoint",
        "`model build --out` onto another model's folder",
        lambda ws: build(ws)[:-1] + [str(shutil.copytree(ws.shared.llm, ws.root / "other"))],
        "config.json",
        check=lambda ws: shutil.copytree(ws.shared.llm, ws.root / "same", dirs_exist_ok=True) and None,
    ),
    _c(
        "preset-unknown",
        "checkpoint",
        "`model preset debug-nope`",
        lambda ws: ["model", "preset", "debug-nope", "--out", str(ws.root / "p")],
        "debug-nope",
    ),
    _c(
        "tokens-bad-size",
        "checkpoint",
        "`model tokens CKPT 640` (no height)",
        lambda ws: ["model", "tokens", str(ws.checkpoint), "640"],
        "'640'",
        "WIDTHxHEIGHT",
    ),
    _c(
        "tokens-zero-size",
        "checkpoint",
        "`model tokens CKPT 0x0`",
        lambda ws: ["model", "tokens", str(ws.checkpoint), "0x0"],
        "0x0",
    ),
]

CONVERT_CASES = [
    _c(
        "convert-to-original-onto-itself",
        "convert",
        "`convert to-original SRC SRC` (output = input)",
        lambda ws: ["convert", "to-original", str(checkpoint_copy(ws)), str(ws.root / "ckpt")],
        "is the input",
        check=unchanged_checkpoint,
    ),
    _c(
        "convert-to-original-inside",
        "convert",
        "`convert to-original SRC SRC/original` (output inside input)",
        lambda ws: ["convert", "to-original", str(checkpoint_copy(ws)), str(ws.root / "ckpt" / "original")],
        "lies inside the input",
        check=unchanged_checkpoint,
    ),
    _c(
        "convert-from-original-missing",
        "convert",
        "`convert from-original` of a folder that does not exist",
        lambda ws: ["convert", "from-original", str(ws.root / "nope"), str(ws.root / "out")],
        "nope",
    ),
    _c(
        "convert-from-original-of-llava-hf",
        "convert",
        "`convert from-original` of a llava-hf checkpoint",
        lambda ws: ["convert", "from-original", str(ws.checkpoint), str(ws.root / "out")],
        "model_type",
    ),
]

CLI_CASES = [
    _c(
        "cli-unknown-command",
        "cli",
        "`llavakit trian` (typo)",
        lambda ws: ["trian"],
        "invalid choice",
        "train",
    ),
    _c(
        "cli-unknown-flag",
        "cli",
        "`data inspect --frobnicate`",
        lambda ws: inspect(ws, data_file(ws, two_samples()), "--frobnicate"),
        "--frobnicate",
    ),
    _c("cli-missing-required", "cli", "`model build` without `--out`", lambda ws: build(ws)[:-2], "--out"),
    _c(
        "cli-bad-int",
        "cli",
        "`data inspect --model-max-length lots`",
        lambda ws: inspect(ws, data_file(ws, two_samples()), "--model-max-length", "lots"),
        "--model-max-length",
    ),
    _c(
        "plan-unknown-recipe",
        "cli",
        "`plan --recipe llava-next-34b` (not shipped)",
        lambda ws: ["plan", "--recipe", "llava-next-34b"],
        "llava-next-34b",
    ),
    _c(
        "eval-unknown-benchmark",
        "cli",
        "`eval --benchmark mmee` (typo)",
        lambda ws: [
            "eval",
            "--model",
            str(ws.checkpoint),
            "--benchmark",
            "mmee",
            "--out",
            str(ws.root / "e"),
        ],
        "mmee",
    ),
]

CHAT_CASES = [
    _c(
        "chat-device-cuda",
        "chat",
        "`chat --device cuda` on a CPU-only machine",
        lambda ws: chat(ws)[:-4] + ["--device", "cuda"],
        "no CUDA device",
        "--device cpu",
    ),
    _c(
        "chat-device-bogus",
        "chat",
        "`chat --device gpu`",
        lambda ws: chat(ws)[:-4] + ["--device", "gpu"],
        "'gpu'",
        "cpu, cuda",
    ),
    _c(
        "chat-model-missing",
        "chat",
        "`chat --model` folder that does not exist",
        lambda ws: chat(ws, model=ws.root / "nope"),
        "nope",
        "does not exist",
    ),
    _c(
        "chat-image-missing",
        "chat",
        "`chat --image` file that does not exist (nonzero exit, no answer)",
        lambda ws: chat(ws, "--image", str(ws.root / "gone.png")),
        "gone.png",
        forbid=("assistant>", "--image-folder"),
    ),
    _c(
        "chat-image-url",
        "chat",
        "`chat --image https://...` (a URL, not a file)",
        lambda ws: chat(ws, "--image", "https://example.com/cat.png"),
        "https://example.com/cat.png",
        "download",
        forbid=("assistant>",),
    ),
    _c(
        "chat-image-not-an-image",
        "chat",
        "`chat --image notes.txt`",
        lambda ws: chat(ws, "--image", str(text_file(ws.root / "notes.txt"))),
        "notes.txt",
        "not a readable image",
        forbid=("assistant>",),
    ),
    _c(
        "chat-slash-image-missing",
        "chat",
        "`/image gone.png` typed in the chat (chat goes on)",
        lambda ws: chat(ws),
        "gone.png",
        "does not exist",
        code=0,
        stdin="/image gone.png\n/quit\n",
        forbid=("--image-folder", "sample's path"),
    ),
    _c(
        "chat-prompt-too-long",
        "chat",
        "a chat question longer than the model's context (4200 words vs 4096)",
        lambda ws: chat(ws),
        "context is 4096 tokens",
        "/reset",
        code=0,
        stdin=LONG_PROMPT,
        forbid=("assistant>",),
    ),
    _c(
        "chat-max-new-tokens-zero",
        "chat",
        "`chat --max-new-tokens 0`",
        lambda ws: chat(ws)[:-2] + ["--max-new-tokens", "0"],
        "max_new_tokens",
    ),
    _c(
        "chat-negative-temperature",
        "chat",
        "`chat --sample --temperature -1`",
        lambda ws: chat(ws, "--sample", "--temperature", "-1"),
        "temperature",
    ),
    _c(
        "chat-top-p-above-one",
        "chat",
        "`chat --sample --top-p 2`",
        lambda ws: chat(ws, "--sample", "--top-p", "2"),
        "top_p",
    ),
    _c(
        "chat-unknown-template",
        "chat",
        "`chat --template vicuna`",
        lambda ws: chat(ws, "--template", "vicuna"),
        "'vicuna'",
    ),
    _c(
        "chat-video-image-only-model",
        "chat",
        "`chat --video clip.mp4` with a model built without video",
        lambda ws: chat(ws, "--video", str(text_file(ws.root / "clip.mp4", "not a video"))),
        "takes no videos",
        forbid=("assistant>",),
    ),
]

SERVE_CASES = [
    _c(
        "serve-model-missing",
        "serve",
        "`serve --model` folder that does not exist",
        lambda ws: serve(ws)[:2] + [str(ws.root / "nope")] + serve(ws)[3:],
        "nope",
    ),
    _c(
        "serve-duplicate-names",
        "serve",
        "two `--model` with the same name",
        lambda ws: serve(ws, "--model", f"tiny={ws.checkpoint}"),
        "unique",
    ),
    _c(
        "serve-max-batch-zero",
        "serve",
        "`serve --max-batch 0`",
        lambda ws: serve(ws, "--max-batch", "0"),
        "max_batch",
    ),
    _c(
        "serve-port-out-of-range",
        "serve",
        "`serve --port 70000`",
        lambda ws: serve(ws)[:-2] + ["--port", "70000"],
        "70000",
    ),
    _c(
        "serve-device-cuda",
        "serve",
        "`serve --device cuda` on a CPU-only machine",
        lambda ws: serve(ws)[:3] + ["--device", "cuda", "--port", "0"],
        "no CUDA device",
    ),
]

TRAINING_CASES = [
    _c(
        "train-config-missing",
        "training",
        "`train --config` file that does not exist",
        lambda ws: ["train", "--config", str(ws.root / "nope.yaml")],
        "nope.yaml",
        "does not exist",
    ),
    _c(
        "train-config-bad-yaml",
        "training",
        "a run config with broken YAML",
        lambda ws: ["train", "--config", str(text_file(ws.root / "run.yaml", "stages: [\n"))],
        "run.yaml",
        "invalid YAML",
    ),
    _c(
        "train-config-list",
        "training",
        "a run config whose top level is a YAML list",
        lambda ws: ["train", "--config", str(text_file(ws.root / "run.yaml", "- a\n- b\n"))],
        "run.yaml",
        "mapping",
    ),
    _c(
        "train-unknown-key",
        "training",
        "a misspelt key `stages.0.optimm`",
        lambda ws: train(ws, {"optimm": {"lr": 1}}),
        "optimm",
        "valid keys",
    ),
    _c(
        "train-override-form",
        "training",
        "an override without `=` (`lr`)",
        lambda ws: train(ws, None, "lr"),
        "'lr'",
        "key.sub=value",
    ),
    _c(
        "train-override-type",
        "training",
        "`stages.0.max_steps=abc`",
        lambda ws: train(ws, None, "stages.0.max_steps=abc"),
        "max_steps",
        "'abc'",
    ),
    _c(
        "train-unknown-recipe",
        "training",
        "`train --recipe llava-next-34b`",
        lambda ws: ["train", "--recipe", "llava-next-34b"],
        "llava-next-34b",
        "shipped recipes",
    ),
    _c(
        "train-unknown-preset",
        "training",
        "`model.preset: debug-nope`",
        lambda ws: train(ws, None, model={"preset": "debug-nope"}),
        "debug-nope",
    ),
    _c(
        "train-lr-nan",
        "training",
        "`optim.lr: nan`",
        lambda ws: train(ws, None, "stages.0.optim.lr=nan"),
        "optim.lr must be a finite number",
    ),
    _c(
        "train-lr-inf",
        "training",
        "`optim.lr: inf`",
        lambda ws: train(ws, None, "stages.0.optim.lr=inf"),
        "optim.lr must be a finite number",
    ),
    _c(
        "train-betas-one",
        "training",
        "`optim.betas: [0.9]`",
        lambda ws: train(ws, {"optim": {"betas": [0.9]}}),
        "optim.betas must be two numbers",
    ),
    _c(
        "train-num-workers-negative",
        "training",
        "`data.num_workers: -1`",
        lambda ws: train(ws, {"data": {"num_workers": -1}}),
        "data.num_workers must be >= 0",
    ),
    _c(
        "train-max-steps-zero",
        "training",
        "`max_steps: 0`",
        lambda ws: train(ws, {"max_steps": 0}),
        "max_steps",
        check=not_exported,
    ),
    _c(
        "train-max-steps-negative",
        "training",
        "`max_steps: -1`",
        lambda ws: train(ws, {"max_steps": -1}),
        "max_steps",
        check=not_exported,
    ),
    _c("train-seed-negative", "training", "`seed: -1`", lambda ws: train(ws, None, seed=-1), "seed"),
    _c(
        "train-batch-not-divisible",
        "training",
        "`global_batch_size: 3`, `micro_batch_size: 2`",
        lambda ws: train(ws, {"global_batch_size": 3}),
        "not divisible",
    ),
    _c(
        "train-unknown-trainable",
        "training",
        "`trainable: [mm_vision_resampler]`",
        lambda ws: train(ws, {"trainable": ["mm_vision_resampler"]}),
        "mm_vision_resampler",
    ),
    _c(
        "train-skip-policy-bogus",
        "training",
        "`data.skip_policy: ignore`",
        lambda ws: train(ws, {"data": {"skip_policy": "ignore"}}),
        "skip_policy",
        "ignore",
    ),
    _c(
        "train-max-skip-fraction",
        "training",
        "`data.max_skip_fraction: 2`",
        lambda ws: train(ws, {"data": {"skip_policy": "skip", "max_skip_fraction": 2}}),
        "max_skip_fraction",
    ),
    _c(
        "train-data-missing",
        "training",
        "`data.path` that does not exist",
        lambda ws: train(ws, {"data": {"path": str(ws.root / "nope.json")}}),
        "nope.json",
        "does not exist",
    ),
    _c(
        "train-image-folder-missing",
        "training",
        "`data.image_folder` that does not exist",
        lambda ws: train(ws, {"data": {"image_folder": str(ws.root / "no-images")}}),
        "no-images",
    ),
    _c(
        "train-run-dir-is-file",
        "training",
        "`run_dir` that is a file",
        lambda ws: train(ws, None, run_dir=str(text_file(ws.root / "run"))),
        "is a file, not a folder",
    ),
    _c(
        "train-run-dir-unwritable",
        "training",
        "`run_dir` that cannot be created (its parent is a file)",
        unwritable_run_dir,
        "cannot be written",
    ),
    _c(
        "train-projector-with-path",
        "training",
        "`model.projector` together with `model.path`",
        lambda ws: train(ws, None, model={"path": str(ws.checkpoint), "projector": "bogus"}),
        "model.projector",
    ),
    _c(
        "train-template-with-path",
        "training",
        "`model.template` together with `model.path`",
        lambda ws: train(ws, None, model={"path": str(ws.checkpoint), "template": "chatml"}),
        "model.template",
    ),
    _c(
        "train-model-path-missing",
        "training",
        "`model.path` that does not exist",
        lambda ws: train(ws, None, model={"path": str(ws.root / "nope")}),
        "nope",
    ),
    _c(
        "train-projector-file-missing",
        "training",
        "`model.pretrained_projector` file that does not exist",
        lambda ws: train(ws, None, f"model.pretrained_projector={ws.root / 'mm_projector.bin'}"),
        "mm_projector.bin",
    ),
    _c(
        "train-upstream-mixed",
        "training",
        "upstream flags mixed with `--config`",
        lambda ws: train(ws) + ["--learning_rate", "1e-3"],
        "cannot be mixed",
    ),
    _c(
        "train-upstream-unknown-flag",
        "training",
        "an unknown upstream flag `--frobnicate 1`",
        lambda ws: upstream(ws, "--frobnicate", "1"),
        "--frobnicate",
    ),
    _c(
        "train-print-config-upstream",
        "training",
        "`train --print-config` with upstream flags (prints, exit 0)",
        lambda ws: upstream(ws, "--print-config", "--learning_rate", "2e-5"),
        "stages:",
        "lr: 2.0e-05",
        code=0,
    ),
    _c(
        "train-truncated-json",
        "training",
        "training data: a JSON list without its closing `]`",
        lambda ws: train_on(ws, two_samples_json(cut=1)),
        "data.json:",
        "no closing ']'",
        check=not_exported,
    ),
    _c(
        "train-trailing-garbage",
        "training",
        "training data: text after the closing `]`",
        lambda ws: train_on(ws, two_samples_json(tail="\n]\n")),
        "data.json:",
        "unexpected text",
        check=not_exported,
    ),
    _c(
        "train-latin1-data",
        "training",
        "training data: a Latin-1 encoded file",
        lambda ws: train_on(ws, LATIN1),
        "data.json",
        "UTF-8",
        check=not_exported,
    ),
    _c(
        "train-image-bomb",
        "training",
        "training data: a 20000×20000 image",
        lambda ws: train_on(ws, with_image(ws, lambda p: png_header_only(p, 20000, 20000), "big.png")),
        "big.png",
        "400000000 pixels",
        check=not_exported,
    ),
    _c(
        "train-image-1x1",
        "training",
        "training data: a 1×1 image",
        lambda ws: train_on(ws, with_image(ws, lambda p: image(p, 1, 1), "dot.png")),
        "dot.png",
        "below 2 px",
        check=not_exported,
    ),
    _c(
        "train-image-truncated",
        "training",
        "training data: a truncated PNG",
        lambda ws: train_on(ws, with_image(ws, truncated_png, "cut.png")),
        "cut.png",
        "corrupt or truncated",
        check=not_exported,
    ),
    _c(
        "train-max-length-too-small",
        "training",
        "`data.max_length: 16`: every image sample would be dropped",
        lambda ws: train(ws, {"data": {"max_length": 16}}),
        "max_length",
        check=not_exported,
    ),
    _c(
        "train-empty-data",
        "training",
        "training data: a JSON file holding `[]`",
        lambda ws: train_on(ws, "[]"),
        "data.json",
        check=not_exported,
    ),
    _c(
        "train-data-is-folder",
        "training",
        "`data.path` pointing at a folder",
        lambda ws: train(ws, {"data": {"path": str(ws.root)}}),
        "{root} is a folder",
    ),
    _c(
        "train-vision-missing",
        "training",
        "`model.vision` + `model.llm` where the vision folder does not exist",
        lambda ws: train(ws, model={"vision": str(ws.root / "no-vision"), "llm": str(ws.shared.llm)}),
        "model.vision",
        "no-vision does not exist",
    ),
    _c(
        "train-config-is-folder",
        "training",
        "`train --config` pointing at a folder",
        lambda ws: ["train", "--config", str(ws.root)],
        "{root} is a folder",
    ),
    _c(
        "train-resume-after-kill",
        "training",
        "a run killed after step 2's metrics were logged but before its checkpoint, then resumed (exit 0)",
        killed_then_resumed,
        "final model",
        code=0,
        check=metrics_steps_unique,
    ),
    _c(
        "train-resume-planted-pickle",
        "checkpoint",
        "resuming a run whose checkpoint holds a malicious pickled `rank-00000.pt` (old format)",
        resume_from_planted_pickle,
        "rank-00000.pt",
        "older llavakit as a pickle",
        check=nothing_executed,
    ),
    _c(
        "train-rerun-changed-config",
        "training",
        "re-running a finished run_dir with a changed `lr`",
        finished_then_changed,
        "stages.0.optim.lr: 0.001 -> 0.0005",
        "new run_dir",
    ),
    _c(
        "train-diverges",
        "training",
        "`lr: 2e5` (a dropped minus sign): the loss / gradient norm turns non-finite",
        lambda ws: train(ws, {"max_steps": 3, "optim": {"lr": 2e5}}),
        "training stopped",
        "Lower optim.lr",
        check=not_exported,
    ),
    _c(
        "train-lr-overflows",
        "training",
        "`lr: 1e38`: Adam's first step overflows float32",
        lambda ws: train(ws, {"optim": {"lr": 1e38}}),
        "optim.lr 1e+38 is too large",
        check=not_exported,
    ),
    _c(
        "train-video-data-image-model",
        "training",
        "training data with `video` samples for a model built without video",
        lambda ws: train_on(ws, [{**sample("<image>\nWhat happens?", "It moves."), "video": "clip.mp4"}]),
        "no video support",
        "model.video_spec",
    ),
    _c(
        "train-video-spec-bad-field",
        "training",
        "`model.video_spec` with an unknown pooling mode",
        lambda ws: train(ws, model={"preset": "debug-clip-llama", "video_spec": {"pool_mode": "mean"}}),
        "video_spec.pool_mode 'mean'",
        "bilinear",
    ),
    _c(
        "train-literal-eos",
        "training",
        "training data with a literal `</s>` mid-reply (ordinary text by design)",
        lambda ws: train_on(ws, [sample("Say </s>.", "Done </s> here.", sample_id=str(i)) for i in range(2)]),
        "final model",
        code=0,
    ),
]

CASES: list[Case] = [
    *DATA_CASES,
    *CHECKPOINT_CASES,
    *CONVERT_CASES,
    *CLI_CASES,
    *CHAT_CASES,
    *SERVE_CASES,
    *TRAINING_CASES,
]


def failures(case: Case, outcome: Outcome, ws: Workspace) -> list[str]:
    """What is wrong with ``outcome`` for ``case`` (empty: the case passes)."""
    problems = []
    if outcome.escaped or TRACEBACK in outcome.text:
        problems.append("a Python traceback")
    if outcome.code != case.code:
        problems.append(f"exit code {outcome.code}, expected {case.code}")
    for text in case.expect:
        wanted = text.replace("{root}", str(ws.root))
        if wanted not in outcome.text:
            problems.append(f"the message does not say {wanted!r}")
    problems += [f"the message says {text!r}" for text in case.forbid if text in outcome.text]
    if case.check is not None and not problems:
        try:
            case.check(ws)
        except AssertionError as err:
            problems.append(str(err))
    return problems
