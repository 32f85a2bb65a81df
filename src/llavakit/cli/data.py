"""``llavakit data ...``: tools for training data, one action per sub-subcommand.

``llavakit data inspect DATA --image-folder DIR --tokenizer DIR`` streams a LLaVA JSON/JSONL file or a YAML
mixture and reports sample counts, modality split, missing/corrupt images, JSON errors, token lengths after image
expansion, truncation and tiles per image; ``--show N`` prints rendered samples with the supervised spans marked;
``--decode`` fully decodes every image (``--workers`` threads) to find truncated or corrupt files.
The work happens in `llavakit.data.inspect`; this module only parses arguments and prints.

Other actions register themselves in `register` with one ``_register_<action>(actions)`` call each.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its actions to the top-level parser."""
    parser = subparsers.add_parser(
        "data",
        help="Inspect and prepare training data (LLaVA JSON/JSONL/YAML mixtures).",
        description="Tools for LLaVA-format training data.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_inspect(actions)
    _register_synth(actions)


def _register_inspect(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "inspect",
        help="Validate a dataset and report lengths, images, errors and truncation.",
        description=(
            "Stream a LLaVA JSON/JSONL file or YAML mixture and report: sample count, modality split, "
            "missing/unreadable images (with sample ids), JSON errors (file:line), token lengths after image "
            "expansion, truncated/dropped counts and tiles per image. Image sizes come from file headers, checked "
            "with the training loader's limits; --decode also decodes every image fully. Exits 1 when the fraction "
            "of bad samples exceeds --max-error-fraction."
        ),
    )
    parser.add_argument("data", help="LLaVA .json / .jsonl file or a .yaml mixture")
    parser.add_argument(
        "--image-folder", required=True, help="folder that sample 'image' paths are relative to"
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer folder (a checkpoint or tokenizer directory; loaded offline with AutoTokenizer)",
    )
    parser.add_argument("--template", default="vicuna_v1", help="chat template id (default: vicuna_v1)")
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="replace the template's default system prompt (as data.system_prompt)",
    )
    parser.add_argument(
        "--image-spec",
        help="JSON file with an ImageSpec dict, or a checkpoint config.json holding llavakit.image_spec "
        "(default: the LLaVA-1.6 CLIP-336 AnyRes spec)",
    )
    parser.add_argument(
        "--video-folder", default="", help="folder that sample 'video' paths are relative to (default: --image-folder)"
    )
    parser.add_argument(
        "--video-spec",
        help="JSON file with a VideoSpec dict, or a checkpoint config.json holding llavakit.video_spec (default: "
        "the --image-spec checkpoint's, if any); without one, samples with a video are reported as bad",
    )
    parser.add_argument("--model-max-length", type=int, default=4096, help="max tokens after image expansion")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N rendered samples")
    parser.add_argument(
        "--max-error-fraction",
        type=float,
        default=0.0,
        help="exit non-zero when more than this fraction of samples is bad (default 0: any error fails)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random:K mixture sampling")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="decode every image fully, as training will (finds truncated/corrupt files; slower than headers)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads decoding images with --decode (default: up to 8)",
    )
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """Run `llavakit.data.inspect.inspect_data` and print its report; 1 when errors exceed the threshold."""
    from pathlib import Path

    from llavakit.data.inspect import (
        DEFAULT_DECODE_WORKERS,
        InspectOptions,
        inspect_data,
        load_tokenizer_and_spec,
        load_video_spec,
    )
    from llavakit.errors import ConfigError

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    if not 0.0 <= args.max_error_fraction <= 1.0:
        raise ConfigError(
            f"--max-error-fraction {args.max_error_fraction} must be a fraction between 0 and 1 (e.g. 0.01 for 1%)"
        )
    if Path(args.data).is_dir():
        raise ConfigError(f"{args.data} is a folder: pass a LLaVA .json / .jsonl file or a .yaml mixture")
    if not Path(args.image_folder).is_dir():
        raise ConfigError(
            f"--image-folder {args.image_folder} is not a folder: pass the folder the samples' image paths are "
            "relative to"
        )

    tokenizer, image_spec = load_tokenizer_and_spec(args.tokenizer, args.image_spec)
    options = InspectOptions(
        data_path=args.data,
        image_folder=args.image_folder,
        video_folder=args.video_folder,
        video_spec=load_video_spec(args.video_spec or _checkpoint_config(args.image_spec)),
        template=args.template,
        system_prompt=args.system_prompt,
        model_max_length=args.model_max_length,
        show=args.show,
        max_error_fraction=args.max_error_fraction,
        seed=args.seed,
        decode=args.decode,
        decode_workers=DEFAULT_DECODE_WORKERS if args.workers is None else args.workers,
    )
    report = inspect_data(options, tokenizer, image_spec)
    print(report.render())
    return 0 if report.passed else 1


def _checkpoint_config(path: str | None) -> str | None:
    """``path`` when it is a checkpoint ``config.json`` (its llavakit section may hold a video spec), else None."""
    import json
    from pathlib import Path

    if path is None:
        return None
    try:
        return path if "llavakit" in json.loads(Path(path).read_text(encoding="utf-8")) else None
    except (OSError, ValueError):
        return None  # load_tokenizer_and_spec has already reported an unreadable --image-spec


def _register_synth(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "synth",
        help="Generate the built-in synthetic dataset (shapes, colours, small words).",
        description=(
            "Draw procedural images (coloured shapes on a grid, wide/tall canvases, small rendered words) and write "
            "OUT_DIR/align.json (captions), finetune.json (instructions: multi-turn, text-only, two-image), "
            "heldout.jsonl (QA on images never used in training) and manifest.json. Deterministic given --seed; "
            "an OUT_DIR holding the same dataset is reused."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="destination folder")
    parser.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--heldout", type=int, default=120, help="held-out images (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate even if OUT_DIR holds a synthetic dataset: replaces only the files its manifest.json "
        "lists (a folder holding no synthetic dataset is refused)",
    )
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Run `llavakit.data.synth.generate_synth` and print the counts."""
    from llavakit.data.synth import SynthConfig, generate_synth
    from llavakit.errors import ConfigError

    if args.n < 2 or args.heldout < 1:
        raise ConfigError(f"--n {args.n} / --heldout {args.heldout}: need --n >= 2 and --heldout >= 1")

    config = SynthConfig(n_train=args.n, n_heldout=args.heldout, seed=args.seed)
    dataset = generate_synth(args.out_dir, config, overwrite=args.overwrite)
    state = "reused" if dataset.manifest["cached"] else "written"
    print(
        f"{dataset.root} ({state}): " + ", ".join(f"{k} {v}" for k, v in dataset.manifest["counts"].items())
    )
    return 0
