"""Chat templates carried by checkpoints: llava-hf folders prompt as their own template says, ours are read by
transformers 4.57 too, a checkpoint without a processor carries its template in the tokenizer, and the template
can be overridden (``llavakit.load`` and ``llavakit chat``).

Oracles: transformers' ``AutoProcessor`` / ``AutoTokenizer`` loaded from the folder (5.x here, 4.57 in a side
install), never llavakit's rendering of the same template.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_model_transformers4 import _install_side_transformers
from transformers import AutoProcessor, AutoTokenizer

from llavakit.cli.main import main
from llavakit.data.schema import Conversation, Turn
from llavakit.data.templates import get_template
from llavakit.data.tokenize import SampleEncoder
from llavakit.inference import api
from llavakit.inference.prompts import Request
from llavakit.model.llava_next import LlavaNextModel

# Real llava-hf processor templates (their chat_template.json as published; whitespace-free, so one line each).
# llava-hf/llava-v1.6-vicuna-7b-hf (same as llava-1.5): images first, "ROLE: " prefixes, {% generation %} markers.
LLAVA_HF_VICUNA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf: [INST] rounds, system as <<SYS>>, and its "<\s> " typo after replies.
LLAVA_HF_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# llava-hf/llama3-llava-next-8b-hf: Llama-3 headers, images glued together, "\n" before the text.
LLAVA_HF_LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# The Llama-3 LLM's own text template, as llava-hf repos keep it in tokenizer_config.json next to the processor's.
LLAMA3_TEXT = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)

CONVERSATIONS = {
    "image": Conversation((Turn("user", "<image>\nWhat is shown?"),)),
    "two_images": Conversation((Turn("user", "<image>\n<image>\nWhich one is red?"),)),
    "multi_turn": Conversation(
        (
            Turn("user", "<image>\nWhat is it?"),
            Turn("assistant", "A red circle."),
            Turn("user", "And the square?"),
        )
    ),
}


def parts_messages(conversation: Conversation) -> list[dict]:
    """The conversation as transformers' documentation writes it: images first, then the text, as parts."""
    out = []
    for turn in conversation.turns:
        images = [{"type": "image"}] * turn.text.count("<image>\n")
        out.append(
            {
                "role": turn.role,
                "content": [*images, {"type": "text", "text": turn.text.replace("<image>\n", "")}],
            }
        )
    return out


def llava_hf_folder(checkpoint: Path, destination: Path, templates: dict[str, str]) -> Path:
    """A copy of ``checkpoint`` as transformers / llava-hf publish it: no "llavakit" section, ``templates`` (file
    name → Jinja) as its chat templates."""
    shutil.copytree(checkpoint, destination)
    config = json.loads((destination / "config.json").read_text())
    del config["llavakit"]
    (destination / "config.json").write_text(json.dumps(config))
    (destination / "chat_template.jinja").unlink()
    for name, template in templates.items():
        if name == "chat_template.jinja":
            (destination / name).write_text(template)
        elif name == "chat_template.json":
            (destination / name).write_text(json.dumps({"chat_template": template}))
        else:
            tokenizer_config = json.loads((destination / name).read_text())
            (destination / name).write_text(json.dumps({**tokenizer_config, "chat_template": template}))
    return destination


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize(
    "templates",
    [
        {"chat_template.json": LLAVA_HF_VICUNA},
        {"chat_template.jinja": LLAVA_HF_MISTRAL},
        {"tokenizer_config.json": LLAVA_HF_LLAMA3},
        {"chat_template.json": LLAVA_HF_LLAMA3, "tokenizer_config.json": LLAMA3_TEXT},
    ],
    ids=["vicuna-json", "mistral-jinja", "llama3-tokenizer-config", "processor-over-tokenizer"],
)
def test_llava_hf_folder_prompts_as_its_template_says(checkpoint, image, tmp_path, templates):
    folder = llava_hf_folder(checkpoint, tmp_path / "hf", templates)
    assistant = api.load(folder, device="cpu")
    assert assistant.template.id == "processor"
    processor = AutoProcessor.from_pretrained(folder)
    # vLLM's order: the processor's template, else the tokenizer's.
    oracle = processor if processor.chat_template else processor.tokenizer
    for name, conversation in CONVERSATIONS.items():
        expected = oracle.apply_chat_template(
            parts_messages(conversation), tokenize=False, add_generation_prompt=True
        )
        segments = assistant.template.render(conversation, for_generation=True, tokenizer=assistant.tokenizer)
        assert "".join(s.text for s in segments) == expected, name
    # Token ids with the image expanded: transformers' processor adds the BOS these templates do not write.
    conversation = CONVERSATIONS["image"]
    text = oracle.apply_chat_template(
        parts_messages(conversation), tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=[Image.open(image).convert("RGB")], text=text, return_tensors="pt")
    batch = assistant.prompts.batch([Request(conversation, (image,))])
    assert batch.input_ids.tolist() == inputs["input_ids"].tolist()


def test_llava_hf_folder_without_a_template_uses_the_family_default(checkpoint, tmp_path):
    folder = llava_hf_folder(checkpoint, tmp_path / "hf", {})
    assert LlavaNextModel.from_pretrained(folder).config.template == "vicuna_v1"


def test_template_override_replaces_the_checkpoint_template(checkpoint, tmp_path):
    folder = llava_hf_folder(checkpoint, tmp_path / "hf", {"chat_template.jinja": LLAVA_HF_MISTRAL})
    conversation = CONVERSATIONS["image"]
    own = api.load(folder, device="cpu").prompts.batch([Request(conversation, (Image.new("RGB", (8, 8)),))])
    assistant = api.load(folder, device="cpu", template="vicuna_v1", system_prompt="Answer in one word.")
    batch = assistant.prompts.batch([Request(conversation, (Image.new("RGB", (8, 8)),))])
    prompt = assistant.tokenizer.decode(batch.input_ids[0])
    assert "[INST]" in assistant.tokenizer.decode(own.input_ids[0]) and "[INST]" not in prompt
    assert "Answer in one word. USER: <image>" in prompt and prompt.endswith("What is shown? ASSISTANT:")


def test_cli_chat_passes_the_template_override(checkpoint, monkeypatch):
    real_load, loaded = api.load, []

    def recording_load(*args, **kwargs):  # the real load; keeps the Assistant the command built
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(api, "load", recording_load)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    argv = [
        "chat",
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--template",
        "llava_v1",
        "--system-prompt",
        "Be brief.",
    ]
    assert main(argv) == 0
    (assistant,) = loaded
    assert assistant.template == get_template("llava_v1", system_prompt="Be brief.")


def test_checkpoint_without_a_processor_carries_the_template_in_its_tokenizer(preset_parts, tmp_path):
    kwargs = {
        **preset_parts("debug-clip-llama").from_parts_kwargs(),
        "projector": "linear",
        "template": "llava_v1",
    }
    model = LlavaNextModel.from_parts(**kwargs, system_prompt="Be 'brief'.")
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llavakit"
    assert not (folder / "processor_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = get_template("llava_v1", system_prompt="Be 'brief'.")
    encoder = SampleEncoder(model.tokenizer, template)
    for name, conversation in CONVERSATIONS.items():
        rendered = tokenizer.apply_chat_template(
            parts_messages(conversation), tokenize=False, add_generation_prompt=True
        )
        body = "".join(s.text for s in template.render(conversation, for_generation=True))
        assert rendered == model.tokenizer.bos_token + body, name
        images = [1] * rendered.count("<image>")
        expected = encoder.encode(conversation, images, for_generation=True).input_ids
        assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected, name


CHILD = r"""
import json, os, sys
import transformers
from transformers import AutoProcessor, AutoTokenizer
assert transformers.__version__ == "4.57.6", transformers.__version__
spec = json.load(open(sys.argv[1]))
out = {}
for folder, chats in spec.items():
    tokenizer = AutoTokenizer.from_pretrained(folder)
    owners = {"tokenizer": tokenizer}
    if os.path.exists(os.path.join(folder, "processor_config.json")):
        owners["processor"] = AutoProcessor.from_pretrained(folder)
    out[folder] = {
        kind: [owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
        for kind, owner in owners.items()
    }
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_transformers_457_reads_the_exported_templates(preset_parts, tmp_path):
    side = _install_side_transformers()
    saved = {}
    for preset, template_id, projector in (
        ("debug-clip-llama", "vicuna_v1", "mlp2x_gelu"),
        ("debug-clip-llama", "mistral_instruct", "mlp2x_gelu"),
        ("debug-clip-llama", "plain", "mlp2x_gelu"),
        ("debug-siglip-qwen2", "qwen_2_5", "mlp2x_gelu"),
        ("debug-clip-llama", "llava_v1", "linear"),  # no processor: the tokenizer alone carries it
    ):
        kwargs = {**preset_parts(preset).from_parts_kwargs(), "projector": projector, "template": template_id}
        model = LlavaNextModel.from_parts(
            **kwargs, system_prompt=None if template_id == "plain" else "Be 'brief'."
        )
        saved[str(model.save_pretrained(tmp_path / f"{template_id}-{projector}"))] = model
    chats = [parts_messages(CONVERSATIONS["image"]), parts_messages(CONVERSATIONS["two_images"])]
    chats.append([{"role": "user", "content": "<image>\nWhat is shown?"}])  # string content
    spec = {folder: chats for folder in saved}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(side), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rendered = json.loads((tmp_path / "out.json").read_text())
    for folder, model in saved.items():
        template = get_template(model.config.template, system_prompt=model.config.system_prompt)
        encoder = SampleEncoder(model.tokenizer, template)
        bos = model.tokenizer.bos_token if encoder.bos_ids else ""
        conversations = [CONVERSATIONS["image"], CONVERSATIONS["two_images"], CONVERSATIONS["image"]]
        expected = [
            bos + "".join(s.text for s in template.render(c, for_generation=True)) for c in conversations
        ]
        kinds = rendered[folder]
        assert set(kinds) == ({"tokenizer"} if "linear" in folder else {"tokenizer", "processor"}), folder
        for kind, texts in kinds.items():
            assert texts == expected, (folder, kind)
