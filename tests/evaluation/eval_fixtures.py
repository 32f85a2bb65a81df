"""Fixture data in the benchmarks' real layouts, and lmms-eval's own scorers as the oracle (shared by the tests).

`write_parquet` writes rows as a Hub snapshot would hold them (a ``datasets`` parquet file with an ``Image``
feature), so the tests read them through the same loader as real data. `lmms_eval_metrics` runs lmms-eval's task
functions (``process_results`` then each metric's aggregation) on the same rows: our scores must equal them.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image


def png_bytes(size: tuple[int, int] = (24, 16), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small PNG (``size`` is width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict[str, Any]], image_columns: Sequence[str] = ("image",)) -> Path:
    """Write ``rows`` as a parquet file with ``datasets.Image`` columns (values: PNG bytes or None)."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    path.parent.mkdir(parents=True, exist_ok=True)
    table = Dataset.from_list(
        [
            {
                k: ({"bytes": v, "path": None} if k in image_columns and v is not None else v)
                for k, v in row.items()
            }
            for row in rows
        ]
    )
    features = Features(
        {**table.features, **{c: ImageFeature() for c in image_columns if c in table.column_names}}
    )
    table.cast(features).to_parquet(str(path))
    return path


def lmms_eval_metrics(
    process_results: Callable[[dict, list[str]], dict[str, Any]],
    aggregations: dict[str, Callable[..., Any]],
    rows: Sequence[dict[str, Any]],
    predictions: Sequence[str],
    *aggregation_args: Any,
) -> dict[str, Any]:
    """lmms-eval's result for ``rows`` answered with ``predictions``: per metric key, its aggregation's value."""
    results: dict[str, list[Any]] = defaultdict(list)
    for row, prediction in zip(rows, predictions):
        for key, value in process_results(row, [prediction]).items():
            results[key].append(value)
    return {
        key: aggregations[key](values, *aggregation_args)
        for key, values in results.items()
        if key in aggregations
    }
