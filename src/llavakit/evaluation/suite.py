"""``llavakit eval``: load a checkpoint once, run several benchmarks, write one ``metrics.json`` and print tables.

Output layout (``--out DIR``)::

    DIR/metrics.json                 every benchmark's metrics, question and failure counts
    DIR/<benchmark>/predictions.jsonl
    DIR/<benchmark>/metrics.json
    DIR/<benchmark>/<submission files>   (benchmarks scored by a server, e.g. MMBench test)
    DIR/<benchmark>/reviews.jsonl       (benchmarks scored by an LLM judge: every judge exchange)

Under torchrun every rank loads the model on its own device and answers its share of each benchmark (see
`llavakit.evaluation.runner`); rank 0 writes the results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llavakit.distributed import init_distributed
from llavakit.errors import ConfigError
from llavakit.evaluation.judge import JudgeOptions, attach_judge
from llavakit.evaluation.predictions import match_predictions, read_predictions
from llavakit.evaluation.registry import get_benchmark, score
from llavakit.evaluation.runner import EvalOptions, EvalResult, evaluate
from llavakit.evaluation.sources import load_benchmark_data
from llavakit.inference.api import Assistant, load


@dataclass(frozen=True)
class SuiteConfig:
    """One ``llavakit eval`` run.

    Attributes:
        model: checkpoint folder.
        benchmarks: benchmark ids, in order.
        data: benchmark id → data source (Hub id, parquet file/folder, TSV); absent: the benchmark's Hub dataset.
        out: output folder.
        limit: evaluate the first N questions of each benchmark (None: all).
        options: batch size, answer length, progress.
        judge: the LLM judge's model and endpoint, for judge-scored benchmarks (llava_in_the_wild, mmvet).
    """

    model: Path
    benchmarks: tuple[str, ...]
    out: Path
    data: Mapping[str, str] = field(default_factory=dict)
    limit: int | None = None
    options: EvalOptions = EvalOptions()
    judge: JudgeOptions = JudgeOptions()

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ConfigError("name at least one benchmark (--benchmark mme,pope,...)")
        unknown = [name for name in self.data if name not in self.benchmarks]
        if unknown:
            raise ConfigError(
                f"--data names benchmark(s) {unknown} that are not in --benchmark {list(self.benchmarks)}"
            )


def run_suite(
    config: SuiteConfig, assistant: Assistant | None = None, device: str | None = None
) -> list[EvalResult]:
    """Evaluate ``config.model`` on every benchmark; returns the results (complete on rank 0).

    Benchmark ids, data sources and the LLM judge's configuration are checked before the model loads, so a typo
    costs no loading time.

    Args:
        config: what to run.
        assistant: an already loaded model (None: load ``config.model``).
        device: where to load it (None: this rank's CUDA device, else the CPU).
    """
    benchmarks = [
        attach_judge(get_benchmark(name), config.judge, config.out / name) for name in config.benchmarks
    ]
    context = init_distributed(needs_process_group=False)
    sources = [load_benchmark_data(b, config.data.get(b.id)).limited(config.limit) for b in benchmarks]
    assistant = assistant or load(config.model, device=device or context.device)
    results = [
        evaluate(assistant, data, config.out / data.benchmark.id, config.options, context) for data in sources
    ]
    if context.is_main:
        write_summary(config, results)
    return results


def write_summary(config: SuiteConfig, results: Sequence[EvalResult]) -> Path:
    """``out/metrics.json``: per benchmark its metrics, counts and failed question ids."""
    summary = {
        "model": str(config.model),
        "benchmarks": {
            result.benchmark: {
                "metrics": result.metrics,
                "questions": result.questions,
                "generated": result.generated,
                "failed": len(result.failed),
                "failed_ids": sorted(result.failed),
                "submissions": [str(path) for path in result.submissions],
            }
            for result in results
        },
    }
    path = config.out / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def score_file(
    benchmark: str,
    predictions: Path,
    data: str | None = None,
    limit: int | None = None,
    judge: JudgeOptions | None = None,
) -> dict[str, float]:
    """Metrics of a predictions file (JSONL of ``{"question_id", "prediction"}``) against ``benchmark``'s data.

    Every question of the data (its first ``limit``) needs exactly one prediction; unknown, missing and duplicate
    ids are errors naming them. Judge-scored benchmarks ask the LLM ``judge`` again and append its exchanges to
    ``reviews.jsonl`` beside the predictions file.
    """
    bench = attach_judge(get_benchmark(benchmark), judge or JudgeOptions(), predictions.parent)
    source = load_benchmark_data(bench, data).limited(limit)
    rows = source.rows_without_images()
    ids = [bench.row_id(row, index) for index, row in enumerate(rows)]
    matched = match_predictions(ids, read_predictions(predictions), str(predictions), bench.id)
    return score(bench, [{**row, "prediction": matched[key]} for row, key in zip(rows, ids)])
