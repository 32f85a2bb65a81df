"""``llavakit train``: run a recipe / YAML config with dotted overrides, or an upstream ``train_mem.py`` command line.

    llavakit train --recipe qwen2.5-0.5b-siglip stages.0.data.path=... run_dir=runs/x
    llavakit train --config my_run.yaml strategy.name=fsdp2
    torchrun --nproc_per_node 8 -m llavakit.cli.main train --model_name_or_path ... --deepspeed scripts/zero3.json ...

Any flag other than ``--config``, ``--recipe``, ``--print-config`` switches to upstream mode, where the whole
argument list is read as `llava/train/train_mem.py` flags (see `llavakit.training.upstream_flags`).
"""

from __future__ import annotations

import argparse
import os

import yaml

from llavakit.errors import ConfigError

_OWN_FLAGS = ("--config", "--recipe", "--print-config", "--help", "-h")


def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavakit train",
        description="Train a LLaVA-NeXT model stage by stage (align → mid → finetune) on 1 process, DDP or FSDP2 "
        "(launch with torchrun). Also accepts upstream llava/train/train_mem.py flags unchanged.",
    )
    parser.add_argument("--config", help="YAML run config (merged over --recipe when both are given)")
    parser.add_argument("--recipe", help="shipped recipe name (see llavakit.training.recipes.recipe_names())")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. stages.0.optim.lr=1e-4"
    )
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``; its arguments are parsed in `run` because upstream flags are open-ended."""
    # prefix_chars="+" makes every token (including --flags) a plain value for this subparser.
    parser = subparsers.add_parser(
        "train",
        help="train a model (recipes, YAML configs or upstream flags)",
        prefix_chars="+",
        add_help=False,
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def _is_upstream(arguments: list[str]) -> bool:
    return any(token.startswith("--") and token.split("=")[0] not in _OWN_FLAGS for token in arguments)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train every stage, print where the results are."""
    from llavakit.training.recipes import recipe_names, resolve_config
    from llavakit.training.trainer import train
    from llavakit.training.upstream_flags import config_from_upstream_flags

    arguments = list(args.arguments)
    if not arguments or "-h" in arguments or "--help" in arguments:
        _own_parser().print_help()
        print(f"\nshipped recipes: {', '.join(recipe_names())}")
        return 0
    if _is_upstream(arguments):
        if any(token.split("=")[0] in ("--config", "--recipe") for token in arguments):
            raise ConfigError("upstream flags cannot be mixed with --config/--recipe; use one style")
        print_only = "--print-config" in arguments
        config = config_from_upstream_flags([token for token in arguments if token != "--print-config"])
    else:
        options = _own_parser().parse_args(arguments)
        config = resolve_config(options.config, options.recipe, options.overrides)
        print_only = options.print_config
    if print_only:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    result = train(config)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    for stage in result.stages:
        last = f"{stage.losses[-1]:.4f}" if stage.losses else "(already done)"
        print(
            f"{stage.name}: {stage.steps} steps, last loss {last}, {stage.tokens_per_s:.0f} tokens/s -> {stage.export_dir}"
        )
    print(f"final model: {result.final_checkpoint}")
    return 0
