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
  from-xtuner XTUNER_DIR --template T --out OUT
                          XTuner LLaVA folder (`xtuner convert pth_to_hf`) -> llava-hf layout (see its --help)
"""

XTUNER_DESCRIPTION = """\
Import a LLaVA model trained with XTuner, in the folder `xtuner convert pth_to_hf` writes ("xtuner format"):

  config.json, model*.safetensors, tokenizer*   the LLM, when it was fully tuned
  llm_adapter/                                  peft LoRA of the LLM, when LoRA-tuned (merged onto --llm)
  visual_encoder_adapter/                       peft LoRA of the CLIP tower, when LoRA-tuned (merged onto --vision)
  visual_encoder/                               the whole CLIP tower, when fully tuned
  projector/                                    config.json + model.safetensors (Linear-GELU-Linear, depth N)

A frozen part is not in the folder: name it with --llm / --vision (defaults: the adapters' base_model_name_or_path).
The result is LLaVA-1.5-style: one image padded to a square, features of layer --select-layer without CLS.
XTuner does not save its prompt template: --template takes the XTuner name it was trained with (llama3_chat,
phi3_chat, internlm2_chat, qwen_chat, vicuna; checked against the tokenizer's chat template) or a llavakit id.
Every key and shape is checked; .bin files are read as tensors only, nothing in them is run.

  llavakit convert from-xtuner ./iter_39620_xtuner --template llama3_chat \\
      --vision openai/clip-vit-large-patch14-336 --out ./llava-llama3-llavakit
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
    xtuner = actions.add_parser(
        "from-xtuner", help="XTuner LLaVA folder -> llava-hf layout", description=XTUNER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    xtuner.add_argument("xtuner_dir", help="folder written by `xtuner convert pth_to_hf` (xtuner format)")
    xtuner.add_argument("--template", required=True, help="XTuner prompt template name or llavakit template id")
    xtuner.add_argument("--out", required=True, help="output folder")
    xtuner.add_argument("--vision", default=None, help="CLIP tower (default: visual_encoder_adapter's base)")
    xtuner.add_argument("--llm", default=None, help="base LLM when not fully tuned (default: llm_adapter's base)")
    xtuner.add_argument("--select-layer", type=int, default=-2, help="XTuner's visual_select_layer (default -2)")
    xtuner.add_argument("--dtype", choices=_DTYPES, default="float32", help="parameter dtype written")
    xtuner.set_defaults(func=run_from_xtuner)


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


def run_from_xtuner(args: argparse.Namespace) -> int:
    import torch

    from llavakit.conversion.xtuner import import_xtuner

    out = import_xtuner(
        args.xtuner_dir, args.out, template=args.template, vision=args.vision, llm=args.llm,
        select_layer=args.select_layer, dtype=getattr(torch, args.dtype),
    )
    print(f"saved {out}")
    return 0


def run_to_original(args: argparse.Namespace) -> int:
    from llavakit.conversion.original import export_original
    from llavakit.errors import CheckpointError
    from llavakit.io_safety import check_separate
    from llavakit.model.llava_next import LlavaNextModel

    check_separate(args.out, [args.src], CheckpointError, "convert to-original")  # before the (long) load
    print(f"saved {export_original(LlavaNextModel.from_pretrained(args.src), args.out, sources=[args.src])}")
    return 0
