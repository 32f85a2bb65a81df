"""``llavakit convert``: original LLaVA layout (SGLang, upstream repos) ⇄ llava-hf layout (transformers, vLLM)."""

from __future__ import annotations

import argparse

_DTYPES = ("bfloat16", "float16", "float32")

DESCRIPTION = """\
Convert checkpoints between the original LLaVA layout and the llava-hf layout.

  from-original SRC OUT   original LlavaLlama/LlavaQwen/LlavaMistral... folder -> llava-hf layout (transformers, vLLM)
  to-original   SRC OUT   llava-hf / llavakit folder -> original layout (SGLang, upstream LLaVA code)
  from-upstream-lora LORA_DIR --model-base BASE --out OUT
                          upstream --lora_enable output (adapter + non_lora_trainables.bin) merged onto
                          its base LLM -> llava-hf layout; .bin files are read as tensors only, nothing run
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
    lora = actions.add_parser("from-upstream-lora", help="upstream LoRA + base LLM -> llava-hf layout")
    lora.add_argument("lora_dir", help="upstream LoRA output (adapter_model.*, non_lora_trainables.bin)")
    lora.add_argument("--model-base", required=True, help="base LLM folder or hub id the LoRA was trained on")
    lora.add_argument("--out", required=True, help="output folder")
    lora.add_argument("--vision", default=None, help="vision tower (default: mm_vision_tower)")
    lora.add_argument("--template", default=None, help="chat template id the model was trained with")
    lora.add_argument("--dtype", choices=_DTYPES, default="float32", help="parameter dtype written")
    lora.set_defaults(func=run_from_upstream_lora)


def run_from_original(args: argparse.Namespace) -> int:
    from llavakit.conversion.original import import_original
    from llavakit.errors import CheckpointError
    from llavakit.io_safety import check_separate
    from llavakit.model.checkpoint import save_checkpoint

    sources = [args.src] + ([args.vision] if args.vision else [])
    check_separate(args.out, sources, CheckpointError, "convert from-original")  # before the (long) load
    model = import_original(args.src, vision=args.vision, template=args.template)
    print(f"saved {save_checkpoint(model, args.out, sources=sources)}")
    return 0


def run_from_upstream_lora(args: argparse.Namespace) -> int:
    import torch

    from llavakit.conversion.upstream_lora import import_upstream_lora
    from llavakit.errors import CheckpointError
    from llavakit.io_safety import check_separate
    from llavakit.model.checkpoint import save_checkpoint

    sources = [args.lora_dir, args.model_base] + ([args.vision] if args.vision else [])
    check_separate(args.out, sources, CheckpointError, "convert from-upstream-lora")  # before the (long) load
    dtype = getattr(torch, args.dtype)
    model = import_upstream_lora(args.lora_dir, args.model_base, args.vision, args.template, dtype)
    print(f"saved {save_checkpoint(model, args.out, sources=sources)}")
    return 0


def run_to_original(args: argparse.Namespace) -> int:
    from llavakit.conversion.original import export_original
    from llavakit.errors import CheckpointError
    from llavakit.io_safety import check_separate
    from llavakit.model.llava_next import LlavaNextModel

    check_separate(args.out, [args.src], CheckpointError, "convert to-original")  # before the (long) load
    print(f"saved {export_original(LlavaNextModel.from_pretrained(args.src), args.out, sources=[args.src])}")
    return 0
