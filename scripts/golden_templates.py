"""Regenerate the golden files of upstream LLaVA's chat templates: ``tests/data/golden/upstream_prompts.json``
(rendered prompts) and ``tests/data/golden/upstream_masks.json`` (training ``input_ids`` and label masks).

Run by hand against upstream checkouts fetched outside CI; the tests compare llavakit with the JSON and never import
upstream code::

    git clone https://github.com/LLaVA-VL/LLaVA-NeXT /tmp/LLaVA-NeXT
    git clone https://github.com/haotian-liu/LLaVA /tmp/LLaVA
    .venv/bin/python scripts/golden_templates.py --upstream /tmp/LLaVA-NeXT --upstream /tmp/LLaVA

Prompts: for every checkout, ``llava/conversation.py`` is loaded from the path given and every ``conv_templates`` id
renders a fixed conversation with ``get_prompt`` (as a generation prompt, as a training text, and both again with
the system prompt replaced); its first message is taken as upstream's training data path leaves it
(``DATA_FIRST_MESSAGE`` through ``preprocess_multimodal``: image moved first, wrapped for ``*_mmtag``). The ``masks`` entries of that file hold ``preprocess_qwen`` / ``preprocess_llama3`` on
the same conversation (kept for ``tests/data/test_data_templates.py``).

Masks: upstream's own training path runs on a fixed set of conversations (`CONVERSATIONS`: multi-turn with and
without an image, an image placed after the question, a replaced system prompt) for every template id whose training
goes through a ``preprocess_*`` function: ``preprocess_multimodal`` (the ``<image>``-first move and the ``*_mmtag``
``<Image><image></Image>`` wrap) when the sample has an image, then upstream's dispatcher ``preprocess`` with
``conversation_lib.default_conversation`` set to the template, exactly as ``LazySupervisedDataset`` does. (The
SINGLE-separator ``v0`` family trains through ``_add_speaker_and_signal``, a format llavakit deliberately does not
reproduce; it has no mask entries.) ``train.py`` cannot be imported without upstream's whole training stack
(deepspeed, the model zoo), so its functions, and ``tokenizer_image_token`` from ``llava/mm_utils.py``, are compiled
from the files' source into a namespace holding what they use: the checkout's ``conversation.py`` and
``constants.py`` modules, torch, transformers and ``IS_TOKENIZER_GREATER_THAN_0_14`` computed as upstream does.

Tokenizers (recorded per case in the JSON):

- ``llama``, ``qwen2``, ``llama3``, ``gemma``: the byte-level BPE test tokenizers of ``tests/data/conftest.py``
  (trained locally, each family's real special tokens). A byte-level tokenizer tokenises a piece alone as inside the
  whole text, which is what upstream's offset arithmetic calls ``legacy=True``; that is the value given.
- ``sentencepiece`` / ``sentencepiece_legacy``: a SentencePiece-style BPE (``▁`` for spaces, Metaspace pre-tokenizer)
  trained here on the rendered prompts and written to ``tests/data/golden/`` next to the masks. ``prepend_scheme``
  ``"first"`` is transformers' non-legacy Llama tokenizer (no ``▁`` after a special token, ``legacy=False``),
  ``"always"`` the legacy one (``legacy=True``); they exercise the ±1 token offsets of ``preprocess_v1`` /
  ``preprocess_mpt`` and the "-2" of ``preprocess_llama_2`` on the ``[INST]`` and Vicuna templates.

Upstream's tokenizer assumptions are bridged, nothing else changed: its literal Qwen newline id 198 becomes the test
tokenizer's newline id, ``apply_chat_template`` is asked for a plain id list (transformers 5 returns a dict by
default), ``additional_special_tokens_ids`` names the ChatML tokens, and ``legacy`` is set as above. Token ids are
stored as token strings (upstream's image sentinel -200 as ``<image>``) and labels as the ``[start, end)`` token spans
that are supervised, so the file reads as text; a sample upstream masks entirely (its "tokenization mismatch"
warning) is recorded with the warning.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

# LLaVA-NeXT's conversation.py asks the Hub for a Llama-3 tokenizer at import; offline it falls back at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from packaging import version  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"
OUTPUT = GOLDEN / "upstream_prompts.json"
MASKS_OUTPUT = GOLDEN / "upstream_masks.json"
MESSAGES = ["<image>\nWhat is in the image?", "The image shows a red circle.", "How many shapes are there?"]
# MESSAGES[0] as the training data holds it: upstream's preprocess_multimodal moves the image to the front (MESSAGES[0])
# and, for the *_mmtag versions, wraps it (in LLaVA-NeXT only when it moved it; hence the image after the text).
DATA_FIRST_MESSAGE = "What is in the image?\n<image>"
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

# The conversations of upstream_masks.json: (has image, system prompt replacement, LLaVA-format turns).
CONVERSATIONS: dict[str, dict[str, Any]] = {
    "image_multi_turn": {"image": True, "system": None, "turns": [*MESSAGES, LAST_ANSWER]},
    "image_multi_turn_system": {"image": True, "system": REPLACED_SYSTEM, "turns": [*MESSAGES, LAST_ANSWER]},
    "image_single_turn": {
        "image": True,
        "system": None,
        "turns": ["<image>\nDescribe the image.", "A red circle on a white background."],
    },
    "image_after_text": {
        "image": True,
        "system": None,
        "turns": ["What color is the circle?\n<image>", "Red.", "And the background?", "White."],
    },
    "text_multi_turn": {
        "image": False,
        "system": None,
        "turns": ["What is a circle?", "A round shape.", "And a square?", "A shape with four equal sides."],
    },
}
# upstream_masks.json: the functions run (upstream's dispatcher picks one per template) and the ones they call.
UPSTREAM_FUNCTIONS = (
    "preprocess_multimodal",
    "preprocess_plain",
    "preprocess_llama_2",
    "preprocess_v1",
    "preprocess_mpt",
    "preprocess_gemma",
    "preprocess_qwen",
    "preprocess_llama3",
    "preprocess",
)
# Styles trained through upstream's legacy `_add_speaker_and_signal` path, which llavakit does not reproduce.
LEGACY_PATH_STYLES = {"SINGLE"}
# Test tokenizer per separator style (MPT with Zephyr's </s> uses the llama one, as the prompt tests do).
MASK_STYLE_TOKENIZER = {
    "TWO": "llama",
    "LLAMA_2": "llama",
    "PLAIN": "llama",
    "MPT": "qwen2",
    "CHATML": "qwen2",
    "LLAMA_3": "llama3",
    "GEMMA": "gemma",
}
# Template ids also run with the SentencePiece-style tokenizers (one per function family where offsets matter).
SENTENCEPIECE_IDS = (
    "vicuna_v1",
    "llava_v1_mmtag",
    "llava_llama_2",
    "llava_llama_2_mmtag",
    "mistral_instruct",
    "chatml_direct",
    "mistral_zephyr",
)
SENTENCEPIECE_FILE = "upstream_masks_tokenizer.json"
SENTENCEPIECE_NAMES = {"sentencepiece": False, "sentencepiece_legacy": True}  # name: legacy
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]


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
    conv = with_system(conv_template, system)
    conv.tokenizer = tokenizer
    for number, message in enumerate(messages):
        conv.append_message(conv.roles[number % 2], message)
    return conv.get_prompt()


def with_system(conv_template: Any, system: str | None) -> Any:
    """A copy of ``conv_template`` whose system prompt is ``system`` (None: unchanged)."""
    conv = conv_template.copy()
    if system is not None:
        # MPT / CHATML keep the role header line inside ``system``: replace only the text after it.
        header = conv_template.system.split("\n", 1)[0] + "\n" if conv_template.sep_style.name in HEADER_STYLES else ""
        conv.system = header + system
    return conv


def prompts(namespace: dict[str, Any], conversation: ModuleType, tokenizers: dict[str, Any]) -> dict[str, dict]:
    """``{template id: {case: prompt}}`` for every upstream id, the messages as upstream's training data path
    leaves them (``DATA_FIRST_MESSAGE`` through ``preprocess_multimodal``)."""
    result = {}
    for template_id, conv_template in sorted(conversation.conv_templates.items()):
        style = conv_template.sep_style.name
        if style in SKIPPED_STYLES:
            continue
        conversation.default_conversation = conv_template
        data_args = SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
        placed = namespace["preprocess_multimodal"]([[{"from": "human", "value": DATA_FIRST_MESSAGE}]], data_args)
        messages = [placed[0][0]["value"], *MESSAGES[1:]]
        generation, training = [*messages, None], [*messages, LAST_ANSWER]
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
    """The test tokenizer as upstream's preprocess code expects a Llama / Qwen2 / Llama-3 one.

    Args:
        tokenizer: the tokenizer.
        special: the ChatML tokens ``additional_special_tokens_ids`` names.
        legacy: what ``tokenizer.legacy`` answers (Llama tokenizers' flag that upstream's offsets read).
    """

    def __init__(self, tokenizer: Any, special: list[str], legacy: bool | None = None) -> None:
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_special", special)
        if legacy is not None:
            object.__setattr__(self, "legacy", legacy)

    def __deepcopy__(self, memo: dict) -> _UpstreamView:
        return _UpstreamView(copy.deepcopy(self._tokenizer, memo), self._special, self.__dict__.get("legacy"))

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


def _function_defs(path: Path, names: typing.Iterable[str]) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    wanted = set(names)
    return [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]


def upstream_namespace(checkout: Path, conversation: ModuleType) -> dict[str, Any]:
    """train.py's `UPSTREAM_FUNCTIONS` and mm_utils.py's ``tokenizer_image_token`` compiled from ``checkout``'s
    source, in a namespace holding what they use. Set ``NEWLINE_ID`` before calling ``preprocess_qwen``."""
    constants = load_module(checkout / "llava" / "constants.py", f"upstream_constants_{checkout.name}")
    defs = _function_defs(checkout / "llava" / "train" / "train.py", UPSTREAM_FUNCTIONS)
    defs = [_NewlineId().visit(node) if node.name == "preprocess_qwen" else node for node in defs]
    defs += _function_defs(checkout / "llava" / "mm_utils.py", ["tokenizer_image_token"])
    namespace: dict[str, Any] = {
        "copy": copy,
        "re": re,
        "torch": torch,
        "transformers": transformers,
        "tokenizers": tokenizers,
        "conversation_lib": conversation,
        # As upstream computes it; only referenced by preprocess_v1 / preprocess_mpt.
        "IS_TOKENIZER_GREATER_THAN_0_14": version.parse(tokenizers.__version__) >= version.parse("0.14"),
        "DataArguments": SimpleNamespace,
        "NEWLINE_ID": None,
        **{name: getattr(constants, name) for name in dir(constants) if name.isupper()},
        **{name: getattr(typing, name) for name in ("Dict", "List", "Optional", "Sequence")},
    }
    module = ast.fix_missing_locations(ast.Module(body=defs, type_ignores=[]))
    exec(compile(module, str(checkout / "llava" / "train" / "train.py"), "exec"), namespace)  # noqa: S102
    return namespace


def masks(namespace: dict[str, Any], conversation: ModuleType, tokenizers: dict[str, Any]) -> dict[str, dict]:
    """``{template id: {"function", "tokens", "supervised"}}`` of upstream_prompts.json: ``MASK_FUNCTIONS`` on the
    prompt tests' conversation, for the ids trained by them."""
    source = [{"from": ("human", "gpt")[n % 2], "value": v} for n, v in enumerate([*MESSAGES, LAST_ANSWER])]
    result = {}
    for name, (tokenizer_name, version_name) in MASK_FUNCTIONS.items():
        if name not in namespace:
            continue
        tokenizer = tokenizers[tokenizer_name]
        namespace["NEWLINE_ID"] = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
        special = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokenizer.get_vocab()]
        out = namespace[name]([source], _UpstreamView(tokenizer, special))
        ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        ids = [image_id if i == IMAGE_TOKEN_INDEX else i for i in ids]
        record = {
            "function": name,
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "supervised": [label != IGNORE_INDEX for label in labels],
        }
        for template_id, conv_template in conversation.conv_templates.items():
            if conv_template.version == version_name:
                result[template_id] = record
    return result


def sentencepiece_backend(corpus: list[str]) -> Tokenizer:
    """A SentencePiece-style BPE trained on ``corpus``: ``▁`` for spaces, a ``<s>`` BOS on every call, ``<image>``
    added, non-legacy pre-tokenization (`with_prepend` switches it)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    # Split at ``▁`` like SentencePiece, so no token holds a space inside (upstream's offsets assume that).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SENTENCEPIECE_SPECIALS, show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return backend


def with_prepend(backend: Tokenizer, legacy: bool) -> transformers.PreTrainedTokenizerFast:
    """``backend`` as the transformers tokenizer upstream would hold (``<unk>`` as padding, as LLaVA sets it), with
    ``▁`` prepended after special tokens only when ``legacy`` (transformers' Llama ``legacy`` flag)."""
    spec = json.loads(backend.to_str())
    for part in ("pre_tokenizer", "decoder"):
        spec[part]["prepend_scheme"] = "always" if legacy else "first"
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.model_max_length = 4096
    return tokenizer


def sentencepiece_corpus(conversations: list[ModuleType]) -> list[str]:
    """Every prompt the SentencePiece cases render, so the tokenizer never needs ``<unk>``."""
    corpus = []
    for conversation in conversations:
        for template_id in SENTENCEPIECE_IDS:
            if template_id not in conversation.conv_templates:
                continue
            for spec in CONVERSATIONS.values():
                text = render(conversation.conv_templates[template_id], spec["turns"], spec["system"], None)
                corpus.append(text.replace("<image>", "<Image></Image>"))
    return corpus * 4


def run_preprocess(
    namespace: dict[str, Any], conv_template: Any, spec: dict[str, Any], tokenizer: Any
) -> tuple[str, list[int], list[int], str | None]:
    """Upstream's training path on one conversation: (function, input_ids, labels, mismatch warning or None)."""
    conversation = namespace["conversation_lib"]
    conversation.default_conversation = with_system(conv_template, spec["system"])
    sources = [[{"from": ("human", "gpt")[n % 2], "value": v} for n, v in enumerate(spec["turns"])]]
    if spec["image"]:
        data_args = SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
        sources = namespace["preprocess_multimodal"](copy.deepcopy(sources), data_args)
    called = []
    dispatcher_globals = dict(namespace)
    for name in UPSTREAM_FUNCTIONS[1:-1]:
        if name in namespace:
            dispatcher_globals[name] = _recorded(namespace[name], name, called)
    dispatcher = type(namespace["preprocess"])(namespace["preprocess"].__code__, dispatcher_globals)
    style = conv_template.sep_style.name
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if style in ("CHATML", "LLAMA_3") and spec["system"] is not None:
            # The dispatcher never passes a system prompt; these functions take it as an argument.
            name = "preprocess_qwen" if style == "CHATML" else "preprocess_llama3"
            called.append(name)
            out = namespace[name](sources, tokenizer, has_image=spec["image"], system_message=spec["system"])
        else:
            out = dispatcher(sources, tokenizer, has_image=spec["image"])
    if len(called) != 1:
        raise RuntimeError(f"{conv_template.version}: upstream's preprocess called {called}, expected one function")
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    warning = printed.getvalue().strip() or None
    return called[0], ids, labels, warning


def _recorded(function: Callable, name: str, called: list[str]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        called.append(name)
        return function(*args, **kwargs)

    return wrapper


def supervised_spans(labels: list[int]) -> list[list[int]]:
    """``[start, end)`` of every run of supervised labels."""
    spans: list[list[int]] = []
    for index, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if spans and spans[-1][1] == index:
            spans[-1][1] = index + 1
        else:
            spans.append([index, index + 1])
    return spans


def mask_cases(
    namespace: dict[str, Any], conversation: ModuleType, tokenizers: dict[str, Any]
) -> list[dict[str, Any]]:
    """One record per (template id, conversation, tokenizer) for the ids upstream trains with a preprocess
    function."""
    cases = []
    for template_id, conv_template in sorted(conversation.conv_templates.items()):
        style = conv_template.sep_style.name
        if style in LEGACY_PATH_STYLES:
            continue
        tokenizer_names = [mask_tokenizer(conv_template)]
        if template_id in SENTENCEPIECE_IDS:
            tokenizer_names += list(SENTENCEPIECE_NAMES)
        for conversation_name, spec in CONVERSATIONS.items():
            if style == "PLAIN" and (len(spec["turns"]) != 2 or not spec["image"] or spec["system"]):
                continue  # preprocess_plain: one image turn and its caption, no system prompt
            if style == "GEMMA" and spec["system"]:
                continue  # Gemma has no system role
            for tokenizer_name in tokenizer_names:
                cases.append(
                    mask_case(namespace, conv_template, template_id, conversation_name, tokenizers, tokenizer_name)
                )
    return cases


def mask_tokenizer(conv_template: Any) -> str:
    """The test tokenizer of a template (Zephyr's ``</s>``-separated MPT style takes the Llama one)."""
    style = conv_template.sep_style.name
    return "llama" if style == "MPT" and conv_template.sep != "<|im_end|>" else MASK_STYLE_TOKENIZER[style]


def mask_case(
    namespace: dict[str, Any],
    conv_template: Any,
    template_id: str,
    conversation_name: str,
    tokenizers: dict[str, Any],
    tokenizer_name: str,
) -> dict[str, Any]:
    tokenizer = tokenizers[tokenizer_name]
    # Llama-family tokenizers carry the flag (transformers' default True for the byte-level ones); others lack it.
    legacy = SENTENCEPIECE_NAMES.get(tokenizer_name, True if tokenizer_name in ("llama", "gemma") else None)
    namespace["NEWLINE_ID"] = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    special = [t for t in ("<|im_start|>", "<|im_end|>") if t in tokenizer.get_vocab()]
    spec = CONVERSATIONS[conversation_name]
    function, ids, labels, warning = run_preprocess(
        namespace, conv_template, spec, _UpstreamView(tokenizer, special, legacy)
    )
    if len(ids) != len(labels) or any(
        label not in (IGNORE_INDEX, token) for label, token in zip(labels, ids)
    ):
        raise RuntimeError(f"{template_id}/{conversation_name}: a label that is neither -100 nor its input id")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    tokens = tokenizer.convert_ids_to_tokens([image_id if i == IMAGE_TOKEN_INDEX else i for i in ids])
    return {
        "template": template_id,
        "conversation": conversation_name,
        "tokenizer": tokenizer_name,
        "legacy": legacy,
        "function": function,
        "mismatch_warning": warning,
        "tokens": tokens,
        "supervised": supervised_spans(labels),
    }


def commit_of(checkout: Path, given: str | None) -> str:
    if given:
        return given
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def write_masks(path: Path, command: str, sources: list[dict[str, Any]]) -> None:
    """The masks JSON with one case per line, so a regeneration diffs case by case."""
    header = {
        "generated_by": command,
        "tokenizers": {
            "llama qwen2 llama3 gemma": "tests/data/conftest.py `tokenizers` fixture (byte-level BPE, trained locally)",
            "sentencepiece": f"{SENTENCEPIECE_FILE} (Metaspace prepend_scheme 'first', legacy=False)",
            "sentencepiece_legacy": "the same file with prepend_scheme 'always' (legacy=True)",
        },
        "conversations": CONVERSATIONS,
    }
    lines = ["{"]
    lines += [f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}," for key, value in header.items()]
    lines.append(' "sources": [')
    for number, source in enumerate(sources):
        lines.append(
            f'  {{"repository": {json.dumps(source["repository"])}, "commit": {json.dumps(source["commit"])}, '
            '"cases": ['
        )
        rows = [f"   {json.dumps(case, ensure_ascii=False)}" for case in source["cases"]]
        lines.append(",\n".join(rows))
        lines.append("  ]}" + ("," if number < len(sources) - 1 else ""))
    lines += [" ]", "}"]
    path.write_text("\n".join(lines) + "\n")


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
    parser.add_argument("--masks-output", type=Path, default=MASKS_OUTPUT)
    args = parser.parse_args()
    tokenizers = test_tokenizers()
    conversations = [
        load_module(checkout / "llava" / "conversation.py", f"upstream_conversation_{number}")
        for number, checkout in enumerate(args.upstream)
    ]
    sentencepiece = sentencepiece_backend(sentencepiece_corpus(conversations))
    tokenizers["sentencepiece"] = with_prepend(sentencepiece, legacy=False)
    tokenizers["sentencepiece_legacy"] = with_prepend(sentencepiece, legacy=True)
    sources, mask_sources = [], []
    for number, (checkout, conversation) in enumerate(zip(args.upstream, conversations)):
        repository = args.repository[number] if args.repository else checkout.name
        commit = commit_of(checkout, args.commit[number] if args.commit else None)
        namespace = upstream_namespace(checkout, conversation)
        sources.append(
            {
                "repository": repository,
                "commit": commit,
                "messages": [*MESSAGES, LAST_ANSWER],
                "first_message_in_data": DATA_FIRST_MESSAGE,
                "replaced_system": REPLACED_SYSTEM,
                "prompts": prompts(namespace, conversation, tokenizers),
                "masks": masks(namespace, conversation, tokenizers),
            }
        )
        cases = mask_cases(namespace, conversation, tokenizers)
        mask_sources.append({"repository": repository, "commit": commit, "cases": cases})
    command = shlex.join(["python", "scripts/golden_templates.py", *sys.argv[1:]])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    golden = {"generated_by": command, "sources": sources}
    args.output.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    write_masks(args.masks_output, command, mask_sources)
    sentencepiece.save(str(args.masks_output.parent / SENTENCEPIECE_FILE))


if __name__ == "__main__":
    main()
