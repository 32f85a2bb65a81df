"""The ``llavakit`` console script: a dispatch table of thin subcommands.

Each subcommand lives in its own module under `llavakit.cli` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed arguments and returning an exit code. Modules are
imported only when needed, so ``llavakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from llavakit.errors import LlavakitError

# (subcommand, module under llavakit.cli, one-line help). Order is the order shown in --help.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("model", "model", "Build a model from parts, write debug presets, describe checkpoints, count visual tokens."),
    ("convert", "convert", "Convert between original LLaVA and llava-hf checkpoints."),
    ("data", "data", "Inspect and prepare training data (LLaVA JSON/JSONL/YAML mixtures)."),
    ("train", "train", "Train a model stage by stage (recipes, YAML configs or upstream train_mem.py flags)."),
    ("plan", "plan", "Plan a run's per-GPU memory (weights, gradients, optimizer, activations) and whether it fits."),
    ("eval", "eval", "Evaluate a checkpoint on standard benchmarks (MME, MMBench, POPE, ...) or score predictions."),
    ("chat", "chat", "Chat with a trained model about images (multi-turn, interactive or piped)."),
    ("serve", "serve", "Serve checkpoints over an OpenAI-compatible HTTP API (streaming, batching, images)."),
    ("webui", "webui", "A browser chat UI (Gradio) for a running server or a checkpoint."),
    ("demo", "demo", "Train and evaluate a tiny model on built-in synthetic data, end to end, on a CPU."),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Build the top-level parser; only the module of the chosen subcommand is imported."""
    parser = argparse.ArgumentParser(
        prog="llavakit",
        description="Build, train, evaluate and serve LLaVA-NeXT-style multimodal models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name, help_text in SUBCOMMANDS:
        if chosen == name:
            importlib.import_module(f"llavakit.cli.{module_name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _quiet_optional_kernel_warnings() -> None:
    """bitsandbytes (installed for QLoRA) warns on import that the optional ``kernels`` package is missing, even
    in runs that never quantise; it then uses its own CPU kernels. Keep that line out of every command's output."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llavakit`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    _quiet_optional_kernel_warnings()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except LlavakitError as err:
        print(f"llavakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
