"""Regenerate ``tests/data/golden/upstream_prompts.json``: upstream LLaVA's rendered prompts and training masks.

Run by hand against upstream checkouts fetched outside CI; the tests compare llavakit's templates with the JSON and
never import upstream code::

    git clone https://github.com/LLaVA-VL/LLaVA-NeXT /tmp/LLaVA-NeXT
    git clone https://github.com/haotian-liu/LLaVA /tmp/LLaVA
    .venv/bin/python scripts/golden_templates.py --upstream /tmp/LLaVA-NeXT --upstream /tmp/LLaVA

For every checkout, ``llava/conversation.py`` is loaded from the path given and every ``conv_templates`` id renders
a fixed conversation with ``get_prompt`` (as a generation prompt, as a training text, and both again with the system
prompt replaced). Where ``llava/train/train.py`` defines ``preprocess_qwen`` / ``preprocess_llama3`` (the training
masks llavakit reproduces with ``upstream_quirks``), those functions are taken from the file's source and run on the
same conversation with the test tokenizers of ``tests/data/conftest.py`` (train.py itself cannot be imported
without upstream's whole training stack). Upstream's tokenizer assumptions are bridged, nothing else changed: its
literal Qwen newline id 198 becomes the test tokenizer's newline id, ``apply_chat_template`` is asked for a plain id
list (transformers 5 returns a dict by default), and ``additional_special_tokens_ids`` names the ChatML tokens.
Token ids are stored as token strings, so the file reads as text.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "data" / "golden" / "upstream_prompts.json"
MESSAGES = ["<image>\nWhat is in the image?", "The image shows a red circle.", "How many shapes are there?"]
LAST_ANSWER = "There are three."
REPLACED_SYSTEM = "Answer the questions."
# Templates whose prompt cannot come from a multi-turn get_prompt: PLAIN drops the user text (preprocess_plain).
SKIPPED_STYLES = {"PLAIN"}
NO_SYSTEM_STYLES = {"GEMMA"}
HEADER_STYLES = {"MPT", "CHATML"}
# Test tokenizer (tests/data/conftest.py) per separator style; the others render without one.
STYLE_TOKENIZER = {"LLAMA_3": "llama3"}
MASK_FUNCTIONS = {"preprocess_qwen": ("qwen2", "qwen"), "preprocess_llama3": ("llama3", "llama_v3")}
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenizers() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests" / "data"))
    conftest = load_module(ROOT / "tests" / "data" / "conftest.py", "data_conftest")
    return conftest.tokenizers.__wrapped__()


def render(conv_template: Any, messages: list[str | None], system: str | None, tokenizer: Any) -> str:
    style = conv_template.sep_style.name
    conv = conv_template.copy()
    conv.tokenizer = tokenizer
    if system is not None:
        # MPT / CHATML keep the role header line inside ``system``: replace only the text after it.
        header = conv_template.system.split("\n", 1)[0] + "\n" if style in HEADER_STYLES else ""
        conv.system = header + system
    for number, message in enumerate(messages):
        conv.append_message(conv.roles[number % 2], message)
    return conv.get_prompt()


def prompts(conversation: ModuleType, tokenizers: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{template id: {case: prompt}}`` for every upstream id."""
    generation, training = [*MESSAGES, None], [*MESSAGES, LAST_ANSWER]
    result = {}
    for template_id, conv_template in sorted(conversation.conv_templates.items()):
        style = conv_template.sep_style.name
        if style in SKIPPED_STYLES:
            continue
        tokenizer = tokenizers[STYLE_TOKENIZER[style]] if style in STYLE_TOKENIZER else None
        cases = {"generation": (generation, None), "training": (training, None)}
        if style not in NO_SYSTEM_STYLES:
            cases |= {
                "generation_system": (generation, REPLACED_SYSTEM),
                "training_system": (training, REPLACED_SYSTEM),
            }
        result[template_id] = {
            case: render(conv_template, messages, system, tokenizer)
            for case, (messages, system) in cases.items()
        }
    return result


class _NewlineId(ast.NodeTransformer):
    """Upstream's literal 198 (Qwen2's ``\\n``) → the name ``NEWLINE_ID``."""

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        return ast.Name("NEWLINE_ID", ast.Load()) if node.value == 198 else node


class _UpstreamView:
    """The test tokenizer as upstream's preprocess code expects a Qwen2 / Llama-3 one."""

    def __init__(self, tokenizer: Any, special: list[str]) -> None:
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_special", special)

    def __deepcopy__(self, memo: dict) -> _UpstreamView:
        return _UpstreamView(copy.deepcopy(self._tokenizer, memo), self._special)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tokenizer, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return self._tokenizer.convert_tokens_to_ids(self._special)

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> list[int]:
        return self._tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def mask_functions(train_py: Path, newline_id: int) -> dict[str, Any]:
    """Upstream's preprocess functions (``MASK_FUNCTIONS``) compiled from ``train_py``'s source."""
    tree = ast.parse(train_py.read_text())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in MASK_FUNCTIONS]
    module = ast.fix_missing_locations(_NewlineId().visit(ast.Module(body=wanted, type_ignores=[])))
    namespace = {
        "copy": copy,
        "torch": torch,
        "transformers": transformers,
        "IGNORE_INDEX": IGNORE_INDEX,
        "IMAGE_TOKEN_INDEX": IMAGE_TOKEN_INDEX,
        "NEWLINE_ID": newline_id,
        **{name: getattr(typing, name) for name in ("Dict", "List", "Optional", "Sequence")},
    }
    exec(compile(module, str(train_py), "exec"), namespace)  # noqa: S102 (upstream's code, run by hand)
    return {name: namespace[name] for name in MASK_FUNCTIONS if name in namespace}


def masks(train_py: Path, conversation: ModuleType, tokenizers: dict[str, Any]) -> dict[str, dict[str, list]]:
    """``{template id: {"function", "tokens", "supervised"}}`` for the ids trained by a preprocess function."""
    source = [{"from": ("human", "gpt")[n % 2], "value": v} for n, v in enumerate([*MESSAGES, LAST_ANSWER])]
    result = {}
    for name, (tokenizer_name, version) in MASK_FUNCTIONS.items():
        tokenizer = tokenizers[tokenizer_name]
        functions = mask_functions(train_py, tokenizer("\n", add_special_tokens=False)["input_ids"][0])
        if name not in functions:
            continue
        special = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokenizer.get_vocab()]
        out = functions[name]([source], _UpstreamView(tokenizer, special))
        ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        ids = [image_id if i == IMAGE_TOKEN_INDEX else i for i in ids]
        record = {
            "function": name,
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "supervised": [label != IGNORE_INDEX for label in labels],
        }
        for template_id, conv_template in conversation.conv_templates.items():
            if conv_template.version == version:
                result[template_id] = record
    return result


def commit_of(checkout: Path, given: str | None) -> str:
    if given:
        return given
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--upstream", type=Path, action="append", required=True, help="upstream checkout root"
    )
    parser.add_argument(
        "--repository", action="append", help="owner/name per --upstream (default: folder name)"
    )
    parser.add_argument(
        "--commit", action="append", help="commit per --upstream (default: git rev-parse HEAD)"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    tokenizers = test_tokenizers()
    sources = []
    for number, checkout in enumerate(args.upstream):
        conversation = load_module(checkout / "llava" / "conversation.py", f"upstream_conversation_{number}")
        train_py = checkout / "llava" / "train" / "train.py"
        sources.append(
            {
                "repository": args.repository[number] if args.repository else checkout.name,
                "commit": commit_of(checkout, args.commit[number] if args.commit else None),
                "messages": [*MESSAGES, LAST_ANSWER],
                "replaced_system": REPLACED_SYSTEM,
                "prompts": prompts(conversation, tokenizers),
                "masks": masks(train_py, conversation, tokenizers) if train_py.exists() else {},
            }
        )
    command = shlex.join(["python", "scripts/golden_templates.py", *sys.argv[1:]])
    golden = {"generated_by": command, "sources": sources}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
