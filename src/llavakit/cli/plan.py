"""``llavakit plan``: per-GPU memory of a recipe or config, stage by stage, and whether it fits.

    llavakit plan --recipe llava-next-qwen1.5-72b --gpus 64 --gpu-memory 80GiB
    llavakit plan --config my_run.yaml --gpus 2 --gpu-memory 24GiB strategy.cpu_offload=true
    llavakit plan --all --gpus 8

Overrides are the dotted ``key=value`` of ``llavakit train``. The numbers come from
`llavakit.training.plan.plan_run` (its module docstring says what is counted and what is assumed).
"""

from __future__ import annotations

import argparse

from llavakit.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan``."""
    parser = subparsers.add_parser(
        "plan",
        help="per-GPU memory of a recipe or config, stage by stage, and whether it fits",
        description="Plan the per-GPU memory of a run (parameters, gradients, optimizer states, activations) "
        "from config.json files only: nothing is downloaded or loaded.",
    )
    parser.add_argument("--recipe", help="shipped recipe name")
    parser.add_argument("--config", help="YAML run config (merged over --recipe when both are given)")
    parser.add_argument("--all", action="store_true", help="plan every shipped recipe")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the run (world size); default 1")
    parser.add_argument(
        "--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB, 24GB (default 80GiB)"
    )
    parser.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="HUB_ID=PATH",
        help="config.json (or its folder) of a part not available offline; repeatable",
    )
    parser.add_argument(
        "--supervised-fraction",
        type=float,
        default=1.0,
        help="share of tokens with a label, for the loss's memory (default 1: the worst case)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")
    parser.set_defaults(func=run)


def _model_configs(entries: list[str]) -> dict[str, str]:
    mapping = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--model-config {entry!r}: expected HUB_ID=PATH (e.g. org/model=config.json)")
        mapping[key] = value
    return mapping


def run(args: argparse.Namespace) -> int:
    """Print the plan of each requested run; exit 1 when a stage does not fit or a size is unknown."""
    from llavakit.training.plan import format_plan, parse_size, plan_run
    from llavakit.training.recipes import recipe_names, resolve_config

    gpu_memory = parse_size(args.gpu_memory)
    model_configs = _model_configs(args.model_config)
    if args.all:
        if args.recipe or args.config:
            raise ConfigError("--all plans every shipped recipe: drop --recipe/--config")
        runs = [(name, resolve_config(None, name, args.overrides)) for name in recipe_names()]
    else:
        label = " + ".join(x for x in (args.recipe, args.config) if x)
        runs = [(label, resolve_config(args.config, args.recipe, args.overrides))]
    all_fit = True
    for label, config in runs:
        gpus = 1 if config.strategy.name == "single" else args.gpus
        plan = plan_run(config, gpus, gpu_memory, model_configs, args.supervised_fraction, source=label)
        print(format_plan(plan), end="\n\n")
        all_fit = all_fit and plan.fits
    return 0 if all_fit else 1
