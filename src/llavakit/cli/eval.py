"""``llavakit eval``: evaluate a checkpoint on standard benchmarks, re-score predictions, list benchmarks.

    llavakit eval --model DIR --benchmark mme,pope [--data SRC | --data ID=SRC ...] [--limit N] [--out DIR]
                  [--judge-model M] [--judge-base-url URL]
    llavakit eval score BENCHMARK --data SRC --predictions FILE [--json] [--judge-model M] [--judge-base-url URL]
    llavakit eval custom --model DIR --questions Q.jsonl --image-folder DIR --answers-file A.jsonl
    llavakit eval list

The work happens in `llavakit.evaluation.suite` (and the runner and benchmark modules it uses); this module
parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from llavakit.errors import ConfigError

if TYPE_CHECKING:
    from llavakit.evaluation.judge import JudgeOptions

DESCRIPTION = (
    "Evaluate a checkpoint on benchmarks (lmms-eval task ids: mme, pope, mmbench_en_dev, scienceqa_img, "
    "textvqa_val, gqa, seedbench, ai2d, mmmu_val, ...), prompted with the checkpoint's own chat template and image "
    "spec and scored exactly as lmms-eval's rule-based scorers. Batched greedy generation (length-sorted, "
    "left-padded); under torchrun each rank answers a share and rank 0 merges them. Answers are appended to "
    "OUT/BENCHMARK/predictions.jsonl as they finish: rerunning the same command resumes. Writes OUT/metrics.json "
    "and prints a table per benchmark. 'llavakit eval list' shows the benchmarks and their data sources. "
    "llava_in_the_wild and mmvet are graded by an LLM judge, as lmms-eval grades them: an OpenAI-compatible chat "
    "endpoint whose key is read from OPENAI_API_KEY (endpoint: --judge-base-url, else OPENAI_API_URL or "
    "OPENAI_BASE_URL; model: --judge-model, else MODEL_VERSION, else lmms-eval's gpt-4o-2024-11-20); every "
    "judge exchange is logged to OUT/BENCHMARK/reviews.jsonl."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command and its ``score``, ``custom`` and ``list`` actions."""
    parser = subparsers.add_parser(
        "eval", help="Evaluate a checkpoint on standard benchmarks.", description=DESCRIPTION
    )
    parser.add_argument("--model", help="checkpoint folder (llavakit or llava-hf layout) or a Hub model id")
    parser.add_argument("--benchmark", help="comma-separated benchmark ids, e.g. mme,pope,mmbench_en_dev")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[ID=]SRC",
        help="data source: a Hub dataset id, a .parquet file, a folder of parquet files (a Hub snapshot), a "
        "VLMEvalKit .tsv or a .jsonl question file; with several benchmarks write ID=SRC (repeatable). Default: "
        "each benchmark's own Hub dataset",
    )
    parser.add_argument("--limit", type=int, help="evaluate the first N questions of each benchmark")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="questions per generation batch (default 16)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length cap (default: each benchmark's own)"
    )
    parser.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    parser.add_argument(
        "--device", help="cpu | cuda (default: cuda when available; LOCAL_RANK under torchrun)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_judge_arguments(parser)
    parser.set_defaults(func=run, parser=parser)
    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    _register_score(actions)
    _register_custom(actions)
    _register_list(actions)


def _register_score(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "score",
        help="Recompute a benchmark's metrics from a predictions file, with no model.",
        description=(
            'Score a JSONL predictions file (one {"question_id": ..., "prediction": "..."} per question; ids '
            "as 'llavakit eval list' names them) against the benchmark's data. Every question needs exactly one "
            "prediction: unknown, missing and duplicate ids are errors."
        ),
    )
    parser.add_argument("benchmark", help="benchmark id, e.g. mme")
    parser.add_argument("--predictions", required=True, help="JSONL predictions file")
    parser.add_argument("--data", help="data source (default: the benchmark's Hub dataset)")
    parser.add_argument("--limit", type=int, help="score the first N questions of the data")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_judge_arguments(parser)
    parser.set_defaults(func=run_score)


def _add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The LLM judge's model and endpoint (the API key comes from OPENAI_API_KEY only)."""
    parser.add_argument(
        "--judge-model",
        help="LLM judge model for llava_in_the_wild / mmvet (default: MODEL_VERSION, else gpt-4o-2024-11-20)",
    )
    parser.add_argument(
        "--judge-base-url",
        help="OpenAI-compatible endpoint of the judge (default: OPENAI_API_URL, else OPENAI_BASE_URL, else "
        "https://api.openai.com/v1); its key is read from OPENAI_API_KEY",
    )


def _judge_options(args: argparse.Namespace) -> JudgeOptions:
    from llavakit.evaluation.judge import JudgeOptions

    return JudgeOptions(model=args.judge_model, base_url=args.judge_base_url)


def _register_custom(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "custom",
        help="Answer a question file in LLaVA's evaluation layout (model_vqa_loader) into an answers file.",
        description=(
            'Answer every question of a LLaVA question .jsonl ({"question_id", "image", "text", ...}; images '
            "relative to --image-folder) greedily with the checkpoint's own template, and write an answers .jsonl in "
            'upstream\'s format ({"question_id", "prompt", "text", "answer_id", "model_id", '
            "\"metadata\"}) for upstream's scoring scripts. Resumable: the run's work folder is ANSWERS.run/."
        ),
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub model id")
    parser.add_argument("--questions", required=True, help="question .jsonl file")
    parser.add_argument(
        "--image-folder", required=True, help="folder the questions' image paths are relative to"
    )
    parser.add_argument("--answers-file", required=True, help="answers .jsonl to write")
    parser.add_argument("--limit", type=int, help="answer the first N questions")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="questions per generation batch (default 16)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="answer length cap (default 128, as upstream)")
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_custom)


def _register_list(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("list", help="List the benchmarks, their Hub datasets and prediction ids.")
    parser.set_defaults(func=run_list)


def parse_data(values: list[str], benchmarks: list[str]) -> dict[str, str]:
    """``--data`` values → benchmark id → source (a bare source only with one benchmark)."""
    sources: dict[str, str] = {}
    for value in values:
        name, equals, source = value.partition("=")
        if equals and name in benchmarks:
            key = name
        elif len(benchmarks) == 1 and not (equals and name.isidentifier()):
            key, source = benchmarks[0], value
        else:
            raise ConfigError(
                f"--data {value!r}: with several benchmarks write ID=SRC with ID one of {benchmarks}"
            )
        if key in sources:
            raise ConfigError(f"--data gives benchmark {key!r} two sources")
        sources[key] = source
    return sources


def run(args: argparse.Namespace) -> int:
    """Evaluate the model on the benchmarks and print a table per benchmark."""
    from llavakit.distributed import init_distributed
    from llavakit.evaluation.report import print_metrics
    from llavakit.evaluation.runner import EvalOptions
    from llavakit.evaluation.suite import SuiteConfig, run_suite

    if not args.model or not args.benchmark:
        args.parser.error("--model and --benchmark are required (or use an action: score, list)")
    names = [name.strip() for name in args.benchmark.split(",") if name.strip()]
    config = SuiteConfig(
        model=Path(args.model),
        benchmarks=tuple(names),
        out=Path(args.out),
        data=parse_data(args.data, names),
        limit=args.limit,
        options=EvalOptions(args.batch_size, args.max_new_tokens, progress=not args.no_progress),
        judge=_judge_options(args),
    )
    results = run_suite(config, device=args.device)
    if init_distributed(needs_process_group=False).is_main:
        for result in results:
            print_metrics(result.benchmark, result.metrics, result.failed)
        print(f"metrics: {config.out / 'metrics.json'}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Score a predictions file and print the metrics."""
    from llavakit.evaluation.report import print_metrics
    from llavakit.evaluation.suite import score_file

    metrics = score_file(args.benchmark, Path(args.predictions), args.data, args.limit, _judge_options(args))
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    else:
        print_metrics(args.benchmark, metrics)
    return 0


def run_custom(args: argparse.Namespace) -> int:
    """Answer the question file and write the answers file."""
    from llavakit.evaluation.custom import answer_questions
    from llavakit.evaluation.runner import EvalOptions

    options = EvalOptions(args.batch_size, args.max_new_tokens, progress=not args.no_progress)
    result = answer_questions(
        args.model,
        args.questions,
        args.image_folder,
        args.answers_file,
        options,
        args.limit,
        device=args.device,
    )
    print(f"{result.questions} answers ({len(result.failed)} failed) in {args.answers_file}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print one line per benchmark: id, Hub dataset (subset, split), prediction id column, answer length."""
    from llavakit.evaluation.registry import benchmarks

    registry = benchmarks()
    for name in registry:
        bench = registry.get(name)
        if bench.dataset is None:
            dataset = "--data FILE.jsonl"
        else:
            dataset = bench.dataset + (f" ({bench.subset})" if bench.subset else "") + f", split {bench.split}"
        ids = bench.id_column or "row number"
        print(f"{name:18s} {dataset:60s} id: {ids:12s} max_new_tokens {bench.max_new_tokens}")
    return 0
