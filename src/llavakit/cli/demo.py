"""``llavakit demo``: generate the synthetic data, train a tiny model in two stages, evaluate it, report.

With no arguments it runs the full demo into ``runs/demo`` (minutes on a 2-core CPU); ``--quick`` is the
shortened CI version; ``--chat`` then opens the interactive chat on the trained model. The work happens in
`llavakit.demo.run` and `llavakit.demo.report`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llavakit.demo.run import DemoResult


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="Train and evaluate a tiny model on built-in synthetic data, end to end, on a CPU.",
        description=(
            "1) generate the synthetic dataset (cached in OUT/data), 2) build a tiny random CLIP-like encoder and "
            "Llama-like LLM and compose them, 3) train align then finetune with the demo-tiny recipe (the trainer "
            "behind 'llavakit train'), asking a third of the held-out questions every --eval-every steps (the learning "
            "curve), 4) evaluate on the held-out split with and without images, 5) show three held-out answers, 6) write "
            "OUT/metrics.json, OUT/loss.png, OUT/accuracy.png and OUT/final (the checkpoint)."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and data order (default 0)")
    parser.add_argument("--quick", action="store_true", help="shortened run (small data, few steps) for CI")
    parser.add_argument("--chat", action="store_true", help="open an interactive chat with the trained model")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="N",
        help="ask a third of the held-out questions (all with --quick) every N finetune steps: the learning curve "
        "in the report and OUT/accuracy.png (default 400, 100 with --quick; 0: off)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. stages.1.max_steps=300"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the report and where the outputs are; optionally chat."""
    from llavakit.demo.report import format_report, write_outputs
    from llavakit.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        out_dir=args.out,
        seed=args.seed,
        quick=args.quick,
        overrides=tuple(args.overrides),
        progress=not args.no_progress,
        eval_every=args.eval_every,
    )
    with _library_progress_bars(shown=not args.no_progress):
        result = run_demo(options)
        paths = write_outputs(result, args.out)
    print(format_report(result))
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"chat with it: llavakit chat --model {paths['checkpoint']} --image {_first_image(result)}")
    if args.chat:
        from llavakit.inference.chat import interactive_lines, run_chat

        return run_chat(result.assistant, interactive_lines(sys.stdin, sys.stdout), sys.stdout)
    return 0


@contextlib.contextmanager
def _library_progress_bars(shown: bool) -> Iterator[None]:
    """Hide transformers' and the hub's own bars (writing and loading weights) with --no-progress, then restore."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    if shown:
        yield
        return
    hub_was_enabled = not are_progress_bars_disabled()
    transformers_was_enabled = transformers_logging.is_progress_bar_enabled()
    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_enabled:
            enable_progress_bars()
        if transformers_was_enabled:
            transformers_logging.enable_progress_bar()


def _first_image(result: DemoResult) -> str:
    """A held-out image path to suggest for the chat."""
    with_image = [row for row in result.with_images.rows if row["image"]]
    return with_image[0]["image"][0] if with_image else "IMAGE"
