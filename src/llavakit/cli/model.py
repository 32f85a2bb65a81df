"""``llavakit model``: assemble a model from parts, write a debug preset, describe a checkpoint, count visual tokens."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Work with model checkpoints.

  build    assemble vision encoder + projector + LLM (hub ids or folders) and save in the llava-hf layout
  preset   write a tiny offline debug model (random weights, local tokenizer) — for tests and experiments
  info     print a checkpoint's parts, preprocessing spec, template and transformers compatibility
  tokens   visual tokens (and tiles) an image size costs under a checkpoint's spec, without any pixels
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "model", help="Build, describe and size models.", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="Assemble a model from parts and save it.")
    build.add_argument("--vision", required=True, help="vision checkpoint: hub id or folder (CLIP, SigLIP)")
    build.add_argument("--llm", required=True, help="causal LM checkpoint: hub id or folder")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--projector", default="mlp2x_gelu", help="linear | mlp{N}x_gelu | identity (default mlp2x_gelu)")
    build.add_argument("--select-layer", type=int, default=-2, help="vision hidden-state index (default -2)")
    build.add_argument("--aspect-ratio", default="anyres", help="square | pad | anyres | anyres_max_N")
    build.add_argument("--pinpoints", default=None, help="upstream form, e.g. '(1x1),...,(3x3)' or '[(336,672),...]' (W,H)")
    build.add_argument("--merge-type", default="spatial_unpad", help="flat | spatial | spatial_unpad")
    build.add_argument("--template", default=None, help="chat template id (default: the LLM family's)")
    build.add_argument("--system-prompt", default=None, help="replace the template's default system prompt")
    build.set_defaults(func=run_build)

    preset = actions.add_parser("preset", help="Write a tiny offline debug model.")
    preset.add_argument("name", help="debug-clip-llama | debug-siglip-qwen2")
    preset.add_argument("--out", required=True, help="output folder (the assembled checkpoint goes to OUT/model)")
    preset.set_defaults(func=run_preset)

    info = actions.add_parser("info", help="Describe a checkpoint.")
    info.add_argument("path", help="checkpoint folder")
    info.set_defaults(func=run_info)

    tokens = actions.add_parser("tokens", help="Visual tokens per image size.")
    tokens.add_argument("path", help="checkpoint folder (only config.json is read)")
    tokens.add_argument("sizes", nargs="+", help="image sizes as WIDTHxHEIGHT, e.g. 640x480")
    tokens.set_defaults(func=run_tokens)


def run_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llavakit.anyres.geometry import parse_pinpoints
    from llavakit.errors import CheckpointError, ConfigError
    from llavakit.io_safety import check_separate
    from llavakit.model.checkpoint import part_config, save_checkpoint
    from llavakit.model.llava_next import LlavaNextModel, default_image_spec
    from llavakit.model.vision import VISION_BACKBONES, backbone_for_model_type

    sources = [args.vision, args.llm]
    check_separate(args.out, sources, CheckpointError, "model build")  # before the (long) load
    vision_config = part_config(args.vision, "--vision")
    part_config(args.llm, "--llm")  # a missing or unreachable LLM fails here, not after the vision tower loads
    try:
        backbone = backbone_for_model_type(vision_config.model_type)
    except ConfigError:
        raise CheckpointError(
            f"--vision {args.vision} holds a {vision_config.model_type!r} model, not a vision encoder llavakit "
            f"knows ({', '.join(VISION_BACKBONES.names())}): pass a CLIP or SigLIP folder or Hub id"
        ) from None
    vision_config = getattr(vision_config, "vision_config", vision_config)
    spec = default_image_spec(vision_config, backbone.image_mean, backbone.image_std)
    changes = {"aspect_ratio": args.aspect_ratio, "merge_type": args.merge_type}
    if args.pinpoints:
        changes["pinpoints"] = parse_pinpoints(args.pinpoints, spec.tile_size, order="wh")
    model = LlavaNextModel.from_parts(
        vision=args.vision, llm=args.llm, projector=args.projector, template=args.template,
        select_layer=args.select_layer, image_spec=replace(spec, **changes), vision_encoder=backbone.id,
        system_prompt=args.system_prompt,
    )
    print(f"saved {save_checkpoint(model, args.out, sources=sources)}")
    return 0


def run_preset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llavakit.model.presets import build_preset_model

    out = Path(args.out)
    path = build_preset_model(args.name, out / "parts").save_pretrained(out / "model")
    print(f"saved {path} (parts in {out / 'parts'})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llavakit.model.checkpoint import read_config

    config = read_config(Path(args.path))
    summary = {
        "vision_encoder": config.vision_encoder,
        "vision": {k: config.vision_config.get(k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
        "select_layer": config.select_layer,
        "projector": config.projector,
        "llm": {k: config.text_config.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")},
        "template": config.template,
        "system_prompt": config.system_prompt,
        "image_token_id": config.image_token_id,
        "image_spec": config.image_spec.to_dict(),
        "loads_in_transformers": config.transformers_class() or f"no: {config.transformers_incompatibility()}",
    }
    print(json.dumps(summary, indent=2))
    return 0


def run_tokens(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llavakit.anyres.geometry import count_visual_tokens, grid_shape
    from llavakit.errors import ConfigError
    from llavakit.model.checkpoint import read_config

    spec = read_config(Path(args.path)).image_spec
    for text in args.sizes:
        try:
            width, height = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ConfigError(f"image size {text!r} is not WIDTHxHEIGHT (e.g. 640x480)") from None
        if width < 1 or height < 1:
            raise ConfigError(f"image size {text!r}: width and height must be positive (e.g. 640x480)")
        rows, cols = grid_shape((height, width), spec) if spec.uses_anyres else (0, 0)
        tiles = 1 + rows * cols
        print(f"{width}x{height}: {count_visual_tokens((height, width), spec, tiled=spec.uses_anyres)} visual tokens, "
              f"{tiles} tiles ({rows}x{cols} grid + base)")
    return 0
