"""The benchmark contract: what a standard benchmark (MME, MMBench, POPE, ...) must say about itself.

A `Benchmark` is a value describing one lmms-eval task, split in the same four steps lmms-eval uses, so that each
step can be checked against lmms-eval's own function for it:

- ``doc_to_text(row)`` → the question text sent to the model (prompt wording included; no ``<image>`` marks: the
  runner places the images before the text, as LLaVA's evaluation scripts do);
- ``doc_to_visual(row)`` → the row's images (bytes or paths, decoded later with the checkpoint's image spec);
- ``process_results(row, prediction)`` → per-row values keyed by metric name;
- ``aggregate(results)`` → the metrics, on the scales lmms-eval prints.

A row is a dict of the data source's own columns (the lmms-lab dataset's names; VLMEvalKit TSV rows are renamed to
them by ``from_vlmevalkit``). Scoring never needs the images, which is how `llavakit.evaluation.score` recomputes
metrics from a predictions file with no model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llavakit.anyres.pixels import ImageSource
from llavakit.errors import DataError

Row = Mapping[str, Any]


class Benchmark(ABC):
    """One benchmark split, as lmms-eval defines it.

    Attributes:
        id: lmms-eval's task name (``mme``, ``mmbench_en_dev``, ...).
        dataset: the Hub dataset lmms-eval reads (used when ``--data`` is not given).
        subset: the dataset's config name (``en`` for MMBench-EN), or None.
        split: the split lmms-eval evaluates.
        columns: non-image columns the benchmark reads; a source lacking one is refused, naming it.
        image_columns: columns holding images (possibly empty per row).
        id_column: the column that identifies a row in predictions files when it is unique; None: the row number.
        max_new_tokens: lmms-eval's generation length for the task.
        until: the task's ``generation_kwargs.until``, for the lmms-eval plug-in (lmms-eval's own LLaVA models, and so
            `llavakit.evaluation.runner`, do not cut answers at them).
        pre_prompt / post_prompt: lmms-eval's default ``lmms_eval_specific_kwargs`` wording, shown in reports.
        headline: the metric keys printed first (lmms-eval's ``metric_list``).
    """

    id: str = ""
    dataset: str | None = None
    subset: str | None = None
    split: str = "test"
    columns: tuple[str, ...] = ()
    image_columns: tuple[str, ...] = ("image",)
    id_column: str | None = None
    max_new_tokens: int = 16
    until: tuple[str, ...] = ()
    pre_prompt: str = ""
    post_prompt: str = ""
    headline: tuple[str, ...] = ()

    @abstractmethod
    def doc_to_text(self, row: Row) -> str:
        """The question text for ``row``, with the benchmark's prompt wording."""

    def doc_to_visual(self, row: Row) -> list[ImageSource]:
        """The row's images in order (the non-empty values of ``image_columns``)."""
        return [row[column] for column in self.image_columns if row.get(column) is not None]

    @abstractmethod
    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        """Per-row values keyed by metric name, from the raw model output ``prediction``."""

    @abstractmethod
    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """The metrics from every row's `process_results` values (``results[key]`` in row order).

        Headline keys are lmms-eval's metric names; breakdowns use ``"<group>/<name>"`` keys
        (e.g. ``"category/existence"``).
        """

    def parse(self, row: Row, prediction: str) -> str | None:
        """The answer the scorer read from ``prediction`` (an option letter, yes/no, ...), for the predictions file."""
        return None

    def row_id(self, row: Row, index: int) -> str:
        """The id of ``row`` in predictions files: its ``id_column`` value, else its row number."""
        if self.id_column is None:
            return str(index)
        return str(row[self.id_column])

    def from_vlmevalkit(self, row: Row) -> dict[str, Any]:
        """A VLMEvalKit TSV row (base64 ``image`` already decoded to bytes) in this benchmark's column names."""
        raise DataError(
            f"benchmark {self.id!r} has no VLMEvalKit TSV reader: pass the lmms-lab dataset (a Hub id, a folder "
            "of parquet files or a .parquet file) with --data"
        )

    def attach_images(self, table: Any, source: str | Path | None) -> Any:
        """The rows with their images, for datasets that keep images apart from the questions (GQA); ``table`` as
        read from ``source`` (None: the benchmark's Hub dataset). Unchanged by default."""
        return table

    def complete_rows(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """Rows a VLMEvalKit TSV lacks and the Hub dataset has (MMBench's circular copies); none by default."""
        return list(rows)

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        """Rows from a JSONL file (LLaVA's question-file layout), for benchmarks defined over one."""
        raise DataError(
            f"benchmark {self.id!r} does not read JSONL question files: pass the lmms-lab dataset (a Hub id, a "
            "folder of parquet files or a .parquet file) with --data"
        )

    def write_submission(self, rows: Sequence[Row], out_dir: Path) -> list[Path]:
        """Files for an evaluation server (rows carry ``prediction``); none by default."""
        return []

    def prompt_description(self) -> str:
        """How the prompt is built, for reports."""
        return f"pre_prompt={self.pre_prompt!r} post_prompt={self.post_prompt!r}"
