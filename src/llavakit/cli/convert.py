"""``llavakit convert``: original LLaVA layout (SGLang, upstream repos) ⇄ llava-hf layout (transformers, vLLM)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Convert checkpoints between the original LLaVA layout and the llava-hf layout.

  from-original SRC OUT   original LlavaLlama/LlavaQwen/LlavaMistral... folder -> llava-hf layout (transformers, vLLM)
  to-original   SRC OUT   llava-hf / llavakit folder -> original layout (SGLang, upstream LLaVA code)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="Convert between original LLaVA and llava-hf checkpoints.", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    source = actions.add_parser("from-original", help="original LLaVA folder -> llava-hf layout")
    source.add_argument("src", help="original checkpoint folder")
    source.add_argument("out", help="output folder")
    source.add_argument("--vision", default=None, help="vision tower hub id or folder (default: config's mm_vision_tower)")
    source.add_argument("--template", default=None, help="chat template id the model was trained with")
    source.set_defaults(func=run_from_original)
    target = actions.add_parser("to-original", help="llava-hf folder -> original LLaVA layout")
    target.add_argument("src", help="llava-hf or llavakit checkpoint folder")
    target.add_argument("out", help="output folder")
    target.set_defaults(func=run_to_original)


def run_from_original(args: argparse.Namespace) -> int:
    from llavakit.conversion.original import import_original

    model = import_original(args.src, vision=args.vision, template=args.template)
    print(f"saved {model.save_pretrained(args.out)}")
    return 0


def run_to_original(args: argparse.Namespace) -> int:
    from llavakit.conversion.original import export_original
    from llavakit.model.llava_next import LlavaNextModel

    print(f"saved {export_original(LlavaNextModel.from_pretrained(args.src), args.out)}")
    return 0
