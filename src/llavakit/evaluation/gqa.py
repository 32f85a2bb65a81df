"""GQA testdev-balanced: short answers on scene images, scored as lmms-eval's ``gqa`` task scores them.

Data: lmms-eval's Hub dataset keeps questions and images apart, in two configs of one repository:
``testdev_balanced_instructions`` (12,578 questions: ``id``, ``imageId``, ``question``, ``answer``,
``fullAnswer``, ``types``, ...) and ``testdev_balanced_images`` (``id``, ``image``); lmms-eval's
``gqa_process_docs`` gives each question the image whose ``id`` is its ``imageId``. `GQA.attach_images` does
the same join, so ``--data`` must name what holds both configs: nothing (the Hub dataset, through the Hub
cache), a Hub dataset id, or a local snapshot folder of it (``hf download lmms-lab-encoder/GQA --repo-type
dataset --include "testdev_balanced_*" --local-dir DIR``:
``DIR/testdev_balanced_instructions/testdev-*.parquet`` and ``DIR/testdev_balanced_images/testdev-*.parquet``;
a path to the instructions ``.parquet`` file inside such a snapshot also works). Rows that already carry an
``image`` column (a `datasets` folder saved after joining) are used as they are. A question's ``id`` is GQA's
question id, unique: predictions files key GQA rows by it.

Prompt: the question as it is (not stripped), then "\\nAnswer the question using a single word or phrase."
(lmms-eval's default kwargs). Up to 16 new tokens, cut at the first blank line (lmms-eval's default stop).

Scoring: the task has no ``process_results``, so lmms-eval applies its registered ``exact_match`` metric with
the YAML's ``ignore_case: true`` and ``ignore_punctuation: true``, then ``mean``:

- the answer is stripped (lmms-eval strips every generated answer), the reference (``answer``) is not;
- both are lower-cased and every ASCII punctuation character (``string.punctuation``) is deleted -- *after*
  the strip, so "yes ." keeps its space and misses "yes"; inner spaces are kept as they are;
- a row scores 1 when the two strings are then equal, else 0; ``exact_match`` is the mean (a fraction, 0-1).
  Number words are not mapped: "two" misses "2".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark, Row
from llavakit.evaluation.exact_match import exact_match_text

IMAGES_SUBSET = "testdev_balanced_images"
class GQA(Benchmark):
    """lmms-eval's ``gqa`` task (GQA testdev-balanced)."""

    id = "gqa"
    dataset = "lmms-lab-encoder/GQA"
    subset = "testdev_balanced_instructions"
    split = "testdev"
    columns = ("id", "imageId", "question", "answer")
    id_column = "id"
    max_new_tokens = 16
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    post_prompt = "\nAnswer the question using a single word or phrase."
    headline = ("exact_match",)

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def doc_to_visual(self, row: Row) -> list[ImageSource]:
        # Questions read without `attach_images` have no image: asking them blind would score a different task.
        if row.get("image") is None:
            raise DataError(
                f"GQA question {row['id']!r} has no image: GQA's images are the {IMAGES_SUBSET} config, joined "
                "to the questions by GQA.attach_images; pass --data the snapshot folder holding both configs"
            )
        return [row["image"]]

    def parse(self, row: Row, prediction: str) -> str:
        return exact_match_text(prediction.strip())

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        answer = row["answer"]
        if not isinstance(answer, str):
            raise DataError(f"GQA question {row['id']!r}: answer {answer!r} is not a string")
        return {"exact_match": float(self.parse(row, prediction) == exact_match_text(answer))}

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        scores = results["exact_match"]
        return {"exact_match": sum(scores) / len(scores)}

    def attach_images(self, table: Any, source: str | Path | None) -> Any:
        """The questions of ``table`` each with its image (``image``: bytes or a path), joined on ``imageId``.

        Args:
            table: the instructions rows (a `datasets.Dataset` or a list of dicts); returned unchanged when
                they already have an ``image`` column.
            source: where they came from: None (the Hub dataset), a Hub dataset id, a snapshot folder or a
                ``.parquet`` file inside one (see the module docstring).

        Returns:
            A list of row dicts; rows of one image share its bytes object.

        Raises:
            DataError: the images cannot be found, or a question's image is missing from them (named).
        """
        columns = table[0].keys() if isinstance(table, list) else table.column_names
        if "image" in columns:
            return table
        images = _image_index(self, source)
        rows = table if isinstance(table, list) else table.to_list()
        joined = []
        for row in rows:
            if row["imageId"] not in images:
                raise DataError(
                    f"GQA question {row['id']!r}: image {row['imageId']!r} is not in the {IMAGES_SUBSET} "
                    f"images of {source or self.dataset}; pass a snapshot holding both testdev_balanced "
                    "configs"
                )
            joined.append({**row, "image": images[row["imageId"]]})
        return joined


def _image_index(benchmark: GQA, source: str | Path | None) -> dict[str, Any]:
    """Image id → undecoded image (bytes or path), from the images config beside the questions."""
    from datasets import Image

    table = _images_table(benchmark, source)
    if "id" not in table.column_names or "image" not in table.column_names:
        raise DataError(
            f"GQA images of {source}: expected columns 'id' and 'image', found {table.column_names}"
        )
    table = table.cast_column("image", Image(decode=False))
    return {
        image_id: image.get("bytes") or image.get("path")
        for image_id, image in zip(table["id"], table["image"])
    }


def _images_table(benchmark: GQA, source: str | Path | None) -> Any:
    import datasets

    path = Path(source) if source is not None else None
    if path is None or not path.exists():
        dataset_id = str(source) if source is not None else benchmark.dataset
        try:
            return datasets.load_dataset(dataset_id, name=IMAGES_SUBSET, split=benchmark.split)
        except Exception as err:  # the Hub client raises many types (offline, 404, gated, bad split)
            raise DataError(
                f"cannot load GQA images {dataset_id!r} (subset {IMAGES_SUBSET!r}): {type(err).__name__}: "
                f"{err}. Offline, download both configs (`hf download {benchmark.dataset} --repo-type "
                'dataset --include "testdev_balanced_*" --local-dir DIR`) and pass --data DIR'
            ) from None
    snapshot = path if path.is_dir() else path.parent.parent
    files = sorted((snapshot / IMAGES_SUBSET).glob(f"{benchmark.split}-*.parquet"))
    if not files:
        raise DataError(
            f"{path}: GQA's images are a separate config: expected {snapshot / IMAGES_SUBSET}/"
            f"{benchmark.split}-*.parquet beside the questions; pass --data the snapshot folder holding "
            f"testdev_balanced_instructions/ and {IMAGES_SUBSET}/"
        )
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


BENCHMARKS = (GQA(),)
