"""Run a benchmark on an `Assistant`: batched greedy generation, data-parallel, resumable, then scoring.

Why our own loop rather than lmms-eval's: the prompts go through the checkpoint's own template, tokenisation and
image spec (the same code as training), and three properties a long evaluation needs are built in:

- **Batching by length.** Pending questions are sorted by prompt length (text tokens plus the exact visual-token
  count, read from image headers) and cut into batches, so a batch's rows need little left padding.
- **Data parallel, identical to one process.** The batches are formed from the whole benchmark and dealt to ranks
  round-robin (batch b to rank b mod world), so every row is generated in the same batch as in a 1-process run:
  same padding, same numbers. Each rank appends to its own file; rank 0 merges them.
- **Resumable.** Answers are appended to ``predictions.jsonl`` (flushed, fsynced) as each batch finishes; a rerun
  reads what is there and generates only the rest, then re-scores everything.

Answers end at the template's stop strings and EOS, not at a task's ``until`` strings: lmms-eval's ``llava`` and
``llava_hf`` models (what the LLaVA-NeXT authors report with) read ``until`` but never cut at it.

A question whose image cannot be used is recorded with ``"prediction": null`` and its ``"error"``, counted, listed
in the report and scored as no output; the run goes on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import image_size
from llavakit.data.prepare import default_tiling
from llavakit.data.schema import USER, Conversation, Turn
from llavakit.distributed import DistContext, barrier
from llavakit.errors import DataError, ImageError
from llavakit.evaluation.benchmark import Benchmark
from llavakit.evaluation.predictions import (
    append_records,
    drop_truncated_tail,
    match_predictions,
    read_predictions,
    write_records,
)
from llavakit.evaluation.registry import score
from llavakit.evaluation.sources import BenchmarkData
from llavakit.inference.api import Assistant
from llavakit.inference.prompts import Request, user_text

logger = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class EvalOptions:
    """How to run.

    Attributes:
        batch_size: questions per generation batch.
        max_new_tokens: answer length cap; None: the benchmark's own (lmms-eval's ``generation_kwargs``).
        progress: show a progress bar (questions/s and ETA).
    """

    batch_size: int = 16
    max_new_tokens: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise DataError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass
class EvalResult:
    """What one benchmark run produced (complete on rank 0; other ranks get ``metrics`` empty).

    Attributes:
        benchmark: the benchmark id.
        metrics: lmms-eval's metric keys, plus ``"<group>/<name>"`` breakdowns.
        questions: rows evaluated.
        generated: questions answered by this run (the others came from an earlier, interrupted run).
        failed: ``question_id`` → error, for questions whose image could not be used.
        out_dir: the benchmark's output folder (``predictions.jsonl``, ``metrics.json``, submission files).
        submissions: files written for an evaluation server.
        seconds: generation time of this run.
    """

    benchmark: str
    metrics: dict[str, float]
    questions: int
    generated: int
    failed: dict[str, str] = field(default_factory=dict)
    out_dir: Path | None = None
    submissions: list[Path] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Pending:
    """A question still to answer: its row number, id, text, images and estimated prompt length."""

    index: int
    question_id: str
    text: str
    images: tuple[Any, ...]
    length: int


def evaluate(
    assistant: Assistant,
    data: BenchmarkData,
    out_dir: Path,
    options: EvalOptions = EvalOptions(),
    context: DistContext | None = None,
) -> EvalResult:
    """Answer every question of ``data`` not yet in ``out_dir/predictions.jsonl``, then score all of them.

    Args:
        assistant: the model, on this rank's device.
        data: the benchmark's rows.
        out_dir: this benchmark's output folder (created).
        options: batch size, answer length, progress bar.
        context: the process's place in a torchrun world (None: a single process).
    """
    benchmark = data.benchmark
    rank, world = (context.rank, context.world_size) if context is not None else (0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _row_ids(data)
    if rank == 0:
        _check_run(out_dir, _fingerprint(assistant, data, options))
        _merge_shards(out_dir)
        if (out_dir / PREDICTIONS).is_file():
            drop_truncated_tail(out_dir / PREDICTIONS)
    barrier_if(context)
    done = _done(out_dir / PREDICTIONS)
    pending, failures = _plan(assistant, data, ids, done)
    if rank == 0 and failures:
        append_records(out_dir / PREDICTIONS, failures)
    batches = _batches(pending, options.batch_size)
    mine = batches[rank::world]
    target = out_dir / (PREDICTIONS if world == 1 else f"predictions.rank{rank}.jsonl")
    start = time.perf_counter()
    _generate(assistant, benchmark, mine, target, options, show=options.progress and rank == 0)
    seconds = time.perf_counter() - start
    barrier_if(context)
    result = EvalResult(benchmark.id, {}, len(ids), len(pending), out_dir=out_dir, seconds=seconds)
    if rank == 0:
        _merge_shards(out_dir)
        _finish(data, ids, out_dir, result)
    barrier_if(context)
    return result


def barrier_if(context: DistContext | None) -> None:
    """Wait for every rank when running under torchrun."""
    if context is not None:
        barrier(context)


def _fingerprint(assistant: Assistant, data: BenchmarkData, options: EvalOptions) -> dict[str, Any]:
    """What the answers in an output folder depend on: a resumed run must match it."""
    config = assistant.model.config
    first = next(assistant.model.parameters())
    return {
        "benchmark": data.benchmark.id,
        "data": data.source,
        "max_new_tokens": options.max_new_tokens or data.benchmark.max_new_tokens,
        "template": config.template,
        "system_prompt": config.system_prompt,
        "parameters": sum(p.numel() for p in assistant.model.parameters()),
        "first_parameter_sum": round(float(first.detach().double().sum()), 6),
    }


def _check_run(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Write ``run.json``, or refuse to resume answers that another model, data source or setting produced."""
    path = out_dir / "run.json"
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key in fingerprint if earlier.get(key) != fingerprint[key]]
        if changed:
            raise DataError(
                f"{out_dir} holds answers of another run (different {', '.join(changed)}: {path}); resuming would "
                "score them as this run's: pass a new --out, or delete the folder to start over"
            )
        return
    path.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")


def _done(path: Path) -> dict[str, Any]:
    """Predictions of an earlier (interrupted) run, by question id."""
    return read_predictions(path) if path.is_file() else {}


def _row_ids(data: BenchmarkData) -> list[str]:
    benchmark = data.benchmark
    rows = data.rows_without_images()
    ids = [benchmark.row_id(row, index) for index, row in enumerate(rows)]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
        raise DataError(
            f"{data.source}: {benchmark.id!r} id column {benchmark.id_column!r} repeats {duplicate!r}; "
            "is this the benchmark's own split?"
        )
    return ids


def _plan(
    assistant: Assistant, data: BenchmarkData, ids: list[str], done: dict[str, Any]
) -> tuple[list[_Pending], list[dict[str, Any]]]:
    """The questions to answer (with their prompt lengths) and failure records for unusable images."""
    benchmark = data.benchmark
    spec = assistant.model.config.image_spec
    pending, failures = [], []
    for index, question_id in enumerate(ids):
        row = data.row(index)
        text = benchmark.doc_to_text(row)
        if question_id in done:
            if done[question_id].get("prompt", text) != text:
                raise DataError(
                    f"question {question_id!r} of the saved predictions was asked {done[question_id]['prompt']!r}, "
                    f"not {text!r}: they belong to other data; pass a new --out"
                )
            continue
        images = tuple(benchmark.doc_to_visual(row))
        try:
            sizes = [image_size(image) for image in images]
        except ImageError as err:
            failures.append(_failure(question_id, index, text, err))
            continue
        visual = sum(count_visual_tokens(s, spec, tiled=t) for s, t in zip(sizes, default_tiling(len(sizes))))
        length = len(assistant.tokenizer(text, add_special_tokens=False)["input_ids"]) + visual
        pending.append(_Pending(index, question_id, text, images, length))
    return pending, failures


def _failure(question_id: str, index: int, text: str, err: Exception) -> dict[str, Any]:
    return {"question_id": question_id, "row": index, "prompt": text, "prediction": None, "error": str(err)}


def _batches(pending: list[_Pending], batch_size: int) -> list[list[_Pending]]:
    """Longest prompts first (a too-long batch fails at once, not after hours), ties in row order."""
    ordered = sorted(pending, key=lambda item: (-item.length, item.index))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def _generate(
    assistant: Assistant,
    benchmark: Benchmark,
    batches: list[list[_Pending]],
    target: Path,
    options: EvalOptions,
    show: bool,
) -> None:
    total = sum(len(batch) for batch in batches)
    max_new_tokens = options.max_new_tokens or benchmark.max_new_tokens
    with tqdm(
        total=total, desc=f"eval {benchmark.id}", unit="q", disable=not show, dynamic_ncols=True
    ) as bar:
        for batch in batches:
            records = _answer(assistant, batch, max_new_tokens)
            append_records(target, records)
            bar.update(len(batch))


def _answer(assistant: Assistant, batch: Sequence[_Pending], max_new_tokens: int) -> list[dict[str, Any]]:
    """Records for one batch; if an image fails to decode or a prompt does not fit the model's context, each
    question is retried alone to isolate it (and recorded as a failure)."""
    try:
        answers = assistant.generate_requests(
            [_request(item) for item in batch], max_new_tokens=max_new_tokens
        )
    except (ImageError, DataError) as err:
        if len(batch) == 1:
            return [_failure(batch[0].question_id, batch[0].index, batch[0].text, err)]
        records = []
        for item in batch:
            records.extend(_answer(assistant, [item], max_new_tokens))
        return records
    return [_record(item, answer) for item, answer in zip(batch, answers)]


def _request(item: _Pending) -> Request:
    turn = Turn(USER, user_text(item.text, len(item.images)))
    return Request(Conversation((turn,)), item.images)


def _record(item: _Pending, answer: str) -> dict[str, Any]:
    return {"question_id": item.question_id, "row": item.index, "prompt": item.text, "prediction": answer}


def _merge_shards(out_dir: Path) -> None:
    """Fold ``predictions.rank*.jsonl`` (a distributed run's, possibly interrupted) into ``predictions.jsonl``."""
    shards = sorted(out_dir.glob("predictions.rank*.jsonl"))
    if not shards:
        return
    main = out_dir / PREDICTIONS
    records = _done(main)
    for shard in shards:
        drop_truncated_tail(shard)
        records.update(read_predictions(shard))
    write_records(main, sorted(records.values(), key=lambda r: r.get("row", 0)))
    for shard in shards:
        shard.unlink()


def _finish(data: BenchmarkData, ids: list[str], out_dir: Path, result: EvalResult) -> None:
    """Put predictions in row order, add parsed answers, score, and write metrics and submission files."""
    benchmark = data.benchmark
    path = out_dir / PREDICTIONS
    records = read_predictions(path)
    predictions = match_predictions(ids, records, str(path), benchmark.id)
    rows = data.rows_without_images()
    scored = [{**row, "prediction": predictions[key]} for row, key in zip(rows, ids)]
    for row, key in zip(scored, ids):
        record = records[key]
        if record["prediction"] is not None:
            record["parsed"] = benchmark.parse(row, record["prediction"])
    write_records(path, [records[key] for key in ids])
    result.failed = {key: records[key]["error"] for key in ids if "error" in records[key]}
    result.metrics = score(benchmark, scored)
    result.submissions = benchmark.write_submission(scored, out_dir)
    summary = {
        "benchmark": benchmark.id,
        "data": data.source,
        "questions": result.questions,
        "failed": len(result.failed),
        "failed_ids": sorted(result.failed),
        "prompt": benchmark.prompt_description(),
        "metrics": result.metrics,
    }
    (out_dir / "metrics.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
