"""Custom benchmarks in LLaVA's evaluation layout: a question ``.jsonl`` and an image folder → an answers ``.jsonl``.

Upstream LLaVA evaluates its benchmarks with ``llava/eval/model_vqa_loader.py``: one question per line::

    {"question_id": 7, "image": "COCO_val2014_000000000042.jpg", "text": "What is ...?\\nAnswer ...", "category": "x"}

``image`` is relative to ``--image-folder``; ``text`` is sent as it is, after the image (benchmark prompts such as
"Answer the question using a single word or phrase." are part of the question files). Each answer is one line, keys
in upstream's order::

    {"question_id": 7, "prompt": "What is ...?", "text": "A dog.", "answer_id": "Vd3j...", "model_id": "llava-v1.5-7b",
     "metadata": {}}

where ``prompt`` is the question's ``text``, ``question_id`` keeps its JSON type, ``answer_id`` is a random
22-character id (upstream's ``shortuuid.uuid()``) and ``model_id`` is named from the checkpoint path as upstream
names it (the folder's name, or ``<parent>_checkpoint-N``). Upstream's own scoring scripts then read the file.

Differences from upstream, on purpose: answers are greedy (upstream's scripts pass ``--temperature 0``), prompted
with the checkpoint's own chat template, generated in length-sorted batches and resumable (`llavakit.evaluation.
runner`); a question without ``image`` is asked text-only (upstream's loader requires one); a question whose image
cannot be used gets ``"text": ""`` and its error in ``metadata`` instead of stopping the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.distributed import init_distributed
from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.predictions import read_predictions, write_records
from llavakit.evaluation.runner import PREDICTIONS, EvalOptions, EvalResult, evaluate
from llavakit.evaluation.sources import BenchmarkData, json_object
from llavakit.inference.api import Assistant, load

REQUIRED_FIELDS = ("question_id", "text")
# shortuuid's alphabet (no 0/1/I/O/l): upstream's answer ids are 22 of these characters.
_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class CustomQuestions(Benchmark):
    """A question file in upstream's ``model_vqa_loader`` layout; images are read from ``image_folder``.

    There are no reference answers: the metrics only count answers (``answers``) and empty ones (``empty``).
    """

    id = "custom"
    split = "custom"
    columns = REQUIRED_FIELDS
    image_columns = ("image",)
    id_column = "question_id"
    # upstream model_vqa_loader's --max_new_tokens default
    max_new_tokens = 128
    headline = ("answers", "empty")

    def __init__(self, image_folder: Path) -> None:
        self.image_folder = Path(image_folder)

    def doc_to_text(self, row: Row) -> str:
        return row["text"]

    def doc_to_visual(self, row: Row) -> list[ImageSource]:
        return [str(self.image_folder / row["image"])] if row.get("image") else []

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        return {"answers": 1, "empty": int(not prediction.strip())}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        return {key: float(sum(results[key])) for key in self.headline}

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        """The questions of ``path``; `DataError` names the line of a malformed one."""
        if not path.is_file():
            raise DataError(f"question file {path} does not exist")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                rows.append(_question(line, f"{path}:{number}"))
        if not rows:
            raise DataError(f"question file {path} holds no question")
        return rows

    def prompt_description(self) -> str:
        return "the question's 'text' as it is, after its image (upstream model_vqa_loader)"


def _question(line: str, location: str) -> dict[str, Any]:
    record = json_object(line, location)
    if not isinstance(record.get("text"), str) or not isinstance(record.get("question_id"), (str, int)):
        raise DataError(
            f'{location}: a question needs "question_id" (string or integer) and "text" (string), as in '
            'upstream LLaVA\'s question files: {"question_id": ..., "image": "file.jpg", "text": "..."}'
        )
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{location}: 'image' must be a file name under the image folder, got {image!r}")
    return record


def model_id(path: str | Path) -> str:
    """Upstream's model name for a checkpoint path: its last folder, or ``<parent>_<last>`` for ``checkpoint-*``."""
    parts = str(path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def answer_id() -> str:
    """A random 22-character id in shortuuid's alphabet, like upstream's ``shortuuid.uuid()``."""
    number, digits = uuid.uuid4().int, []
    for _ in range(22):
        number, digit = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(digits)


def work_dir(answers_file: Path) -> Path:
    """Where a run keeps its resumable predictions: ``<answers file>.run/`` next to the answers file."""
    return answers_file.with_name(answers_file.name + ".run")


def answer_questions(
    model: str | Path,
    questions: str | Path,
    image_folder: str | Path,
    answers_file: str | Path,
    options: EvalOptions | None = None,
    limit: int | None = None,
    assistant: Assistant | None = None,
    device: str | None = None,
) -> EvalResult:
    """Answer a LLaVA-layout question file and write the answers file (``llavakit eval custom``).

    Answers are generated by `llavakit.evaluation.runner.evaluate` into ``work_dir(answers_file)`` (a rerun
    generates only the questions not answered yet), then written to ``answers_file`` in the questions' order. Under
    torchrun every rank answers its share; rank 0 writes.

    Args:
        model: checkpoint folder (also names ``model_id``).
        questions: the question ``.jsonl`` (``question_id``, ``image``, ``text``, optional ``category``).
        image_folder: the folder the questions' ``image`` names are relative to.
        answers_file: the answers ``.jsonl`` to write (its folder is created).
        options: batch size, answer length (``max_new_tokens`` None: upstream's 128 tokens), progress bar
            (None: the defaults).
        limit: answer only the first N questions.
        assistant: an already loaded model (None: load ``model``).
        device: where to load it (None: this rank's CUDA device, else the CPU).

    Raises:
        DataError: a missing or malformed question file, a missing image folder, repeated question ids.
    """
    image_folder, answers_file = Path(image_folder), Path(answers_file)
    if not image_folder.is_dir():
        raise DataError(f"image folder {image_folder} does not exist")
    benchmark = CustomQuestions(image_folder)
    data = BenchmarkData(benchmark, str(questions), benchmark.read_jsonl(Path(questions))).limited(limit)
    context = init_distributed(needs_process_group=False)
    assistant = assistant or load(model, device=device or context.device)
    result = evaluate(assistant, data, work_dir(answers_file), options or EvalOptions(), context)
    if context.is_main:
        write_answers(data, result, answers_file, model_id(model))
    return result


def write_answers(data: BenchmarkData, result: EvalResult, answers_file: Path, name: str) -> None:
    """Write upstream's answers file from a finished run's predictions, in the questions' order."""
    records = read_predictions(result.out_dir / PREDICTIONS)
    answers = []
    for index in range(len(data)):
        question = data.table[index]
        record = records[data.benchmark.row_id(question, index)]
        metadata = {"error": record["error"]} if "error" in record else {}
        answers.append(
            {
                "question_id": question["question_id"],
                "prompt": question["text"],
                "text": record["prediction"] or "",
                "answer_id": answer_id(),
                "model_id": name,
                "metadata": metadata,
            }
        )
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    write_records(answers_file, answers)
