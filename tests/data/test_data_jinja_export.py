"""Exported chat templates: transformers prompts a saved checkpoint exactly as llavakit does, for every template id.

For each template id a tiny checkpoint is saved (with its family's tokenizer and special tokens) and loaded back by
transformers alone (``AutoTokenizer`` / ``AutoProcessor`` from the folder). Its ``apply_chat_template`` must render
llavakit's own prompt text (BOS text + segments) byte for byte, with string contents and with OpenAI-style part
lists (through the processor, and through the tokenizer as vLLM's "openai" content format does), and the text
tokenised with ``add_special_tokens=False`` (vLLM's chat path) must give llavakit's ids.
"""

from __future__ import annotations

import json

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

from llavakit.data.schema import Conversation, Turn
from llavakit.data.templates import TEMPLATES, get_template
from llavakit.data.templates.hf_chat import iterates_message_content
from llavakit.data.templates.jinja import jinja_chat_template
from llavakit.data.tokenize import SampleEncoder
from llavakit.errors import DataError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.presets import save_tiny_llm
from llavakit.model.tokenizer import QWEN2_CHAT_TEMPLATE

# Tokenizer (tests/data/conftest.py `tokenizers`) and transformers LLM class per template id.
FAMILY = {
    "plain": "llama",
    "v0": "llama",
    "vicuna_v1": "llama",
    "llava_v1": "llama",
    "llama_2": "llama",
    "mistral_instruct": "llama",
    "chatml_direct": "qwen2",
    "qwen_1_5": "qwen2",
    "qwen_2": "qwen2",
    "qwen_2_5": "qwen2",
    "llava_llama_3": "llama3",
    "gemma_instruct": "gemma",
    "tokenizer": "qwen2",
    "processor": "qwen2",
    "default": "llama",
    "v1": "llama",
    "v0_plain": "llama",
    "v0_mmtag": "llama",
    "v1_mmtag": "llama",
    "llava_v0": "llama",
    "llava_v0_mmtag": "llama",
    "llava_v1_mmtag": "llama",
    "llava_llama_2": "llama",
    "llava_llama_2_simple": "llama",
    "llava_llama_2_mmtag": "llama",
    "llava_mistral_instruct": "llama",
    "mistral_zephyr": "llama",
    "mpt": "qwen2",
    "mistral_orca": "qwen2",
    "mistral_direct": "qwen2",
}
LLM_CLASS = {"llama": "llama", "qwen2": "qwen2", "llama3": "llama", "gemma": "llama"}
# Quotes, a backslash, Jinja syntax, a line break and non-ASCII text must survive as a Jinja string literal.
TRICKY_SYSTEM = 'Answer "briefly" -- it\'s {{ fine }} \\ {% raw %}\r\nsecond line: café ✓'

IMAGE = {"type": "image"}
IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# name → (system message or None, [(role, string content, part-list content)], generation prompt)
CASES = {
    "text": (None, [("user", "What is in the picture?", [text("What is in the picture?")])], True),
    "image": (
        None,
        [("user", "<image>\nWhat is in the picture?", [IMAGE, text("What is in the picture?")])],
        True,
    ),
    "two_images": (
        None,
        [("user", "<image>\n<image>\nWhich one is red?", [IMAGE, IMAGE, text("Which one is red?")])],
        True,
    ),
    "multi_turn": (
        None,
        [
            ("user", "<image>\nWhat is it?", [IMAGE, text("What is it?")]),
            ("assistant", "A red circle.", [text("A red circle.")]),
            ("user", "And the square?", [text("And the square?")]),
        ],
        True,
    ),
    "system": (
        "You are terse.",
        [("user", "<image>\nWhat is it?", [IMAGE, text("What is it?")])],
        True,
    ),
    "history": (
        None,
        [
            ("user", "<image>\nDescribe it.", [IMAGE, text("Describe it.")]),
            ("assistant", "A red circle on white.", [text("A red circle on white.")]),
        ],
        False,
    ),
}


def messages(system: str | None, turns: list, parts: bool, image_part: dict = IMAGE) -> list[dict]:
    out = [] if system is None else [{"role": "system", "content": [text(system)] if parts else system}]
    for role, string, part_list in turns:
        content = [image_part if p is IMAGE else p for p in part_list] if parts else string
        out.append({"role": role, "content": content})
    return out


@pytest.fixture(scope="module")
def exported(tokenizers, preset_parts, tmp_path_factory):
    """``exported(template_id, system_prompt)`` → (checkpoint folder, the model llavakit loads from it)."""
    root = tmp_path_factory.mktemp("exported")
    vision = preset_parts("debug-clip-llama")
    llm_dirs, cache = {}, {}

    def get(template_id: str, system_prompt: str | None):
        key = (template_id, system_prompt)
        if key not in cache:
            family = FAMILY[template_id]
            if family not in llm_dirs:
                llm_dirs[family] = save_tiny_llm(
                    LLM_CLASS[family], tokenizers[family], root / f"llm-{family}"
                )
            kwargs = {**vision.from_parts_kwargs(), "llm": str(llm_dirs[family]), "template": template_id}
            model = LlavaNextModel.from_parts(**kwargs, system_prompt=system_prompt)
            folder = model.save_pretrained(root / f"{template_id}-{len(cache)}")
            cache[key] = folder, LlavaNextModel.from_pretrained(folder)
        return cache[key]

    return get


def llavakit_prompt(
    model: LlavaNextModel, conversation: Conversation, generation: bool
) -> tuple[str, list[int]]:
    """llavakit's prompt text (BOS text + segments) and ids (one token per image), as inference builds them."""
    # Inference renders; quirks would change only training renders of Qwen (its hard-coded system prompt).
    template = get_template(
        model.config.template, upstream_quirks=False, system_prompt=model.config.system_prompt
    )
    encoder = SampleEncoder(model.tokenizer, template)
    images = sum(turn.text.count("<image>") for turn in conversation.turns)
    ids = encoder.encode(conversation, [1] * images, for_generation=generation).input_ids
    segments = template.render(conversation, for_generation=generation, tokenizer=model.tokenizer)
    bos = model.tokenizer.bos_token if encoder.bos_ids else ""
    return bos + "".join(s.text for s in segments), ids


@pytest.mark.parametrize("system_prompt", [None, TRICKY_SYSTEM], ids=["default_system", "configured_system"])
@pytest.mark.parametrize("template_id", sorted(FAMILY))
def test_transformers_renders_llavakit_prompts(template_id, system_prompt, exported):
    folder, model = exported(template_id, system_prompt)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    # Part lists where the template loops over contents (all generated ones; the kept Qwen2 text template does not).
    forms = ["string", "tokenizer parts", "processor parts"]
    if not iterates_message_content(tokenizer.chat_template):
        forms = ["string", "processor string"]
    for name, (system, turns, generation) in CASES.items():
        conversation = Conversation(tuple(Turn(role, string) for role, string, _ in turns), system)
        try:
            expected_text, expected_ids = llavakit_prompt(model, conversation, generation)
        except (
            DataError
        ):  # e.g. plain without an image, gemma with a system message: the template refuses too
            for form in forms:
                with pytest.raises(TemplateError):
                    render(tokenizer, processor, form, system, turns, generation)
            continue
        for form in forms:
            rendered = render(tokenizer, processor, form, system, turns, generation)
            assert rendered == expected_text, (name, form)
            assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected_ids, (name, form)


def render(tokenizer, processor, form: str, system: str | None, turns: list, generation: bool) -> str:
    """transformers' rendering: string contents or part lists (``image_url`` parts, as OpenAI clients send, through
    the tokenizer as vLLM calls it; ``image`` parts through the processor)."""
    if form == "string":
        chat = messages(system, turns, parts=False)
    elif form == "tokenizer parts":
        chat = messages(system, turns, parts=True, image_part=IMAGE_URL)
    else:
        chat = messages(system, turns, parts=form == "processor parts")
    owner = tokenizer if form in ("string", "tokenizer parts") else processor
    return owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)


@pytest.mark.parametrize("template_id", sorted(FAMILY))
def test_tokenizer_and_processor_share_one_template_file(template_id, exported):
    folder, model = exported(template_id, None)
    written = (folder / "chat_template.jinja").read_text()
    assert AutoTokenizer.from_pretrained(folder).chat_template == written
    assert AutoProcessor.from_pretrained(folder).chat_template == written
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    if template_id in ("tokenizer", "processor"):
        assert written == QWEN2_CHAT_TEMPLATE  # kept as it is without a configured system prompt
    else:
        # vLLM serves "openai" part lists to a template that loops over message['content'], strings otherwise
        assert iterates_message_content(written)


def test_kept_template_sends_the_configured_system_prompt_once_across_saves(exported, tmp_path):
    folder, model = exported("tokenizer", TRICKY_SYSTEM)
    again = LlavaNextModel.from_pretrained(model.save_pretrained(tmp_path / "again"))
    written = (tmp_path / "again" / "chat_template.jinja").read_text()
    assert written == (folder / "chat_template.jinja").read_text()
    conversation = Conversation((Turn("user", "<image>\nWhat is it?"),))
    rendered = AutoTokenizer.from_pretrained(tmp_path / "again").apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == llavakit_prompt(again, conversation, generation=True)[0]
    assert rendered.count(TRICKY_SYSTEM) == 1


def test_content_format_detection_on_real_templates():
    """The rule vLLM applies to pick "openai" part lists vs strings, on templates of both kinds."""
    assert not iterates_message_content(QWEN2_CHAT_TEMPLATE)
    llava_hf_vicuna = (  # llava-hf/llava-v1.6-vicuna-7b-hf chat_template.json (shortened, same structure)
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endfor %}"
    )
    assert iterates_message_content(llava_hf_vicuna)
    aliased = "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for p in m.content %}{% endfor %}{% endfor %}"
    assert iterates_message_content(aliased)


def _sentencepiece_tokenizer_with_bos() -> PreTrainedTokenizerFast:
    """Llama/Vicuna as transformers 5 builds them: Metaspace with prepend_scheme="first", a BOS added to every call."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    corpus = [
        "A chat between a curious user and an artificial intelligence assistant. USER: What is in the image? "
        "ASSISTANT: A red circle. [INST] [/INST] <<SYS>> You are a helpful assistant."
    ] * 20
    specials = ["<unk>", "<s>", "</s>", "<image>"]
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


@pytest.mark.parametrize("template_id", ["vicuna_v1", "llama_2", "mistral_instruct", "plain"])
def test_ids_match_for_tokenizers_that_drop_the_prefix_space_after_a_bos(template_id):
    tokenizer = _sentencepiece_tokenizer_with_bos()
    template = get_template(template_id)
    encoder = SampleEncoder(tokenizer, template)
    conversation = Conversation((Turn("user", "<image>\nWhat is in the image?"),))
    body = "".join(s.text for s in template.render(conversation, for_generation=True, tokenizer=tokenizer))
    expected = encoder.encode(conversation, [1], for_generation=True).input_ids
    if template_id != "plain":  # the trap exists: "<s>" glued to text loses the "▁" llavakit's ids have
        assert tokenizer("<s>" + body, add_special_tokens=False)["input_ids"] != expected
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [IMAGE, text("What is in the image?")]}],
        chat_template=jinja_chat_template(template, tokenizer),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.removeprefix("<s>").lstrip(" ") == body
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected


def test_every_template_id_is_covered():
    assert set(FAMILY) == set(TEMPLATES.names())
