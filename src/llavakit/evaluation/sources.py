"""Benchmark data as users have it on disk: lmms-lab Hub datasets, parquet files and folders, VLMEvalKit TSV files.

``load_benchmark_data(benchmark, source)`` reads, in order of what ``source`` is:

- None: the benchmark's own Hub dataset (``lmms-lab/MME``, ...) through `datasets.load_dataset` (cached by the
  Hub client; offline machines pass a local copy instead);
- a ``.parquet`` file, or a folder of them (a downloaded snapshot of the Hub dataset: ``data/test-0000-of-0004.parquet``
  or ``en/dev-0000.parquet``; files are chosen by the benchmark's subset folder and split prefix), or a folder written
  by `datasets.Dataset.save_to_disk`;
- a ``.tsv`` file in VLMEvalKit's layout (base64 ``image`` column), renamed to lmms-lab's columns by the benchmark;
- a ``.jsonl`` question file, for benchmarks defined over one (LLaVA's evaluation layout, the demo's held-out QA);
- any other string: a Hub dataset id.

Image columns are read undecoded (bytes or paths): a corrupt image then fails its own question, counted and listed
by the runner, instead of failing the whole dataset the moment a row is read.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark


@dataclass
class BenchmarkData:
    """The rows of one benchmark split.

    Attributes:
        benchmark: the benchmark the rows belong to.
        source: where they came from (for reports and errors).
        table: a `datasets.Dataset` (images undecoded) or a list of row dicts.
    """

    benchmark: Benchmark
    source: str
    table: Any

    def __len__(self) -> int:
        return len(self.table)

    def row(self, index: int) -> dict[str, Any]:
        """Row ``index`` with its images as bytes or paths."""
        row = dict(self.table[index])
        for column in self.benchmark.image_columns:
            row[column] = _image_value(row.get(column))
        return row

    def rows_without_images(self) -> list[dict[str, Any]]:
        """Every row without its image columns (what scoring reads)."""
        if isinstance(self.table, list):
            return [
                {k: v for k, v in row.items() if k not in self.benchmark.image_columns} for row in self.table
            ]
        present = [c for c in self.benchmark.image_columns if c in self.table.column_names]
        return self.table.remove_columns(present).to_list()

    def limited(self, limit: int | None) -> BenchmarkData:
        """The first ``limit`` rows (all when None)."""
        if limit is None or limit >= len(self):
            return self
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}")
        table = self.table[:limit] if isinstance(self.table, list) else self.table.select(range(limit))
        return BenchmarkData(self.benchmark, self.source, table)


def _image_value(value: Any) -> Any:
    """An undecoded `datasets.Image` value ({"bytes", "path"}) as bytes or a path; other values unchanged."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return value.get("bytes") or value.get("path")
    return value


def load_benchmark_data(benchmark: Benchmark, source: str | Path | None = None) -> BenchmarkData:
    """Read ``benchmark``'s rows from ``source`` (see the module docstring) and check its columns.

    Raises:
        DataError: the source is missing or unreadable, or lacks columns the benchmark reads (named).
    """
    if source is None:
        if benchmark.dataset is None:
            raise DataError(f"benchmark {benchmark.id!r} has no default dataset: pass --data")
        data = _from_hub(benchmark, benchmark.dataset)
    else:
        data = _from_path_or_id(benchmark, source)
    data = BenchmarkData(benchmark, data.source, benchmark.attach_images(data.table, source))
    _check_columns(data)
    return data


def _from_path_or_id(benchmark: Benchmark, source: str | Path) -> BenchmarkData:
    path = Path(source)
    if path.suffix in (".tsv", ".jsonl", ".parquet") and not path.is_file():
        raise DataError(f"data source {path} does not exist")
    if path.suffix == ".tsv":
        return _from_tsv(benchmark, path)
    if path.suffix == ".jsonl":
        return BenchmarkData(benchmark, str(path), benchmark.read_jsonl(path))
    if path.suffix == ".parquet" or path.is_dir():
        return _from_local(benchmark, path)
    if path.exists():
        raise DataError(
            f"{path}: not a data source of benchmark {benchmark.id!r}: pass a Hub dataset id, a .parquet file, "
            "a folder of parquet files (a Hub snapshot), a VLMEvalKit .tsv file or a .jsonl question file"
        )
    return _from_hub(benchmark, str(source))


def _check_columns(data: BenchmarkData) -> None:
    if not len(data):
        raise DataError(f"{data.source}: no rows for benchmark {data.benchmark.id!r}")
    present = set(data.table[0].keys()) if isinstance(data.table, list) else set(data.table.column_names)
    missing = [column for column in data.benchmark.columns if column not in present]
    if missing:
        raise DataError(
            f"{data.source}: missing column(s) {missing} that benchmark {data.benchmark.id!r} reads "
            f"(found: {sorted(present)}); is this the {data.benchmark.dataset or 'right'} data "
            f"(subset {data.benchmark.subset!r}, split {data.benchmark.split!r})?"
        )


def _undecoded(table: Any, benchmark: Benchmark) -> Any:
    """``table`` with its image columns left as bytes/paths."""
    from datasets import Image

    for column in benchmark.image_columns:
        if column in table.column_names and isinstance(table.features[column], Image):
            table = table.cast_column(column, Image(decode=False))
    return table


def _from_hub(benchmark: Benchmark, dataset_id: str) -> BenchmarkData:
    import datasets

    try:
        table = datasets.load_dataset(dataset_id, name=benchmark.subset, split=benchmark.split)
    except Exception as err:  # the Hub client raises many types (offline, 404, gated, bad split)
        raise DataError(
            f"cannot load Hub dataset {dataset_id!r} (subset {benchmark.subset!r}, split {benchmark.split!r}) for "
            f"benchmark {benchmark.id!r}: {type(err).__name__}: {err}. Offline, download it elsewhere "
            f"(`hf download {dataset_id} --repo-type dataset --local-dir DIR`) and pass --data DIR"
        ) from None
    return BenchmarkData(benchmark, dataset_id, _undecoded(table, benchmark))


def _from_local(benchmark: Benchmark, path: Path) -> BenchmarkData:
    import datasets

    if path.is_dir() and (path / "state.json").is_file():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if benchmark.split not in table:
                raise DataError(f"{path}: no split {benchmark.split!r} (has {sorted(table)})")
            table = table[benchmark.split]
    else:
        files = [path] if path.is_file() else _split_files(benchmark, path)
        table = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    return BenchmarkData(benchmark, str(path), _undecoded(table, benchmark))


def _split_files(benchmark: Benchmark, folder: Path) -> list[Path]:
    """The parquet files of ``benchmark``'s subset and split in a Hub snapshot folder: those its dataset card
    maps to them, else those named or foldered like them (the Hub's default layout)."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise DataError(
            f"{folder}: no .parquet files (expected a snapshot of {benchmark.dataset or 'the dataset'})"
        )
    carded = _card_files(benchmark, folder)
    if carded:
        return carded
    if benchmark.subset is not None:
        in_subset = [f for f in files if benchmark.subset in f.relative_to(folder).parts[:-1]]
        # A folder named like the subset is that subset's own download, unless it holds a subfolder of that name:
        # a whole snapshot of a dataset whose config shares its name (lmms-lab DocVQA/DocVQA) has several subsets.
        if not in_subset and folder.name == benchmark.subset:
            in_subset = files
        if not in_subset:
            found = sorted(
                {f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1}
            )
            raise DataError(
                f"{folder}: no '{benchmark.subset}' folder (benchmark {benchmark.id!r} reads subset "
                f"{benchmark.subset!r}); found folders {found}: download that subset or point --data at it"
            )
        files = in_subset

    def in_split(file: Path) -> bool:
        inner = file.relative_to(folder).parts[
            :-1
        ]  # a folder above the snapshot named like the split must not count
        return (
            file.name.startswith((f"{benchmark.split}-", f"{benchmark.split}.")) or benchmark.split in inner
        )

    chosen = [f for f in files if in_split(f)]
    if not chosen:
        raise DataError(
            f"{folder}: no parquet file of split {benchmark.split!r} (files named '{benchmark.split}-*.parquet' or "
            f"in a '{benchmark.split}' folder); found {[str(f.relative_to(folder)) for f in files[:5]]}"
        )
    return chosen


def _card_files(benchmark: Benchmark, folder: Path) -> list[Path]:
    """The parquet files the snapshot's dataset card (``README.md`` YAML header, ``configs:``) lists for the
    benchmark's subset (``default`` or the only config when it has none) and split; [] when it lists none.

    Datasets whose files follow no naming rule (``Lin-Chen/MMStar``: one ``mmstar.parquet`` for split ``val``)
    say there which file is which split, as ``datasets.load_dataset`` reads it.
    """
    card = folder / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return []
    configs = [c for c in header.get("configs") or [] if isinstance(c, dict)] if isinstance(header, dict) else []
    wanted = benchmark.subset or ("default" if len(configs) != 1 else configs[0].get("config_name"))
    for config in configs:
        if config.get("config_name") != wanted:
            continue
        entries = config.get("data_files")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("split") == benchmark.split:
                patterns = entry.get("path")
                patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
                return sorted({f for pattern in patterns for f in folder.glob(pattern) if f.suffix == ".parquet"})
    return []


def _from_tsv(benchmark: Benchmark, path: Path) -> BenchmarkData:
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KiB default field limit
    with path.open(encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle, delimiter="\t"))
    if not records:
        raise DataError(f"{path}: the TSV file holds no row")
    by_index = {record.get("index"): record.get("image") for record in records}
    rows = []
    for number, record in enumerate(records, start=2):
        record["image"] = _tsv_image(record.get("image"), by_index, f"{path}:{number}")
        rows.append(benchmark.from_vlmevalkit(record))
    return BenchmarkData(benchmark, str(path), benchmark.complete_rows(rows))


def _tsv_image(value: str | None, by_index: dict[str | None, str | None], location: str) -> bytes | None:
    """VLMEvalKit's ``image`` field as bytes: base64 text, or (64 characters or fewer) the ``index`` of the row
    holding the same image, as VLMEvalKit stores repeated images; empty stays None."""
    if not value:
        return None
    if len(value) <= 64:
        target = by_index.get(value)
        if not target or len(target) <= 64:
            raise DataError(f"{location}: 'image' refers to row index {value!r}, which holds no image")
        value = target
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{location}: the 'image' field is not base64 (VLMEvalKit TSV layout)") from None


def json_object(line: str, location: str) -> dict[str, Any]:
    """One JSONL line that must hold a JSON object; `DataError` names ``location`` (file:line) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{location}: malformed JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
    return record
