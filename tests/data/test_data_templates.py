"""Golden tests: every chat template against upstream LLaVA-NeXT's ``conversation.py`` and training masks.

The oracle is the vendored upstream code in ``upstream_conversation.py``; the tokenizers are locally trained
byte-level BPEs carrying each family's real special tokens.
"""

from __future__ import annotations

import pytest
import upstream_conversation as upstream

from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.data.templates import TEMPLATES, check_system_prompt, get_template
from llavakit.data.tokenize import IGNORE_INDEX, SampleEncoder
from llavakit.errors import ConfigError, DataError

QUESTION_1 = "<image>\nWhat is in the image?"
ANSWER_1 = "The image shows a red circle."
QUESTION_2 = "How many shapes are there?"
ANSWER_2 = "There are three."

FAMILY = {
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
}
# What upstream supervises around each reply: (text before the reply, end-of-turn marker after it).
REPLY_FRAME = {
    "v0": (" ", "###"),
    "vicuna_v1": (" ", "</s>"),
    "llava_v1": (" ", "</s>"),
    "llama_2": (" ", " </s>"),
    "mistral_instruct": (" ", " </s>"),
    "chatml_direct": ("", "<|im_end|>"),
    "qwen_1_5": ("", "<|im_end|>"),
    "qwen_2": ("", "<|im_end|>"),
    "qwen_2_5": ("", "<|im_end|>"),
    "llava_llama_3": ("", "<|eot_id|>"),
    "gemma_instruct": ("", "<end_of_turn>\n"),
}
QUIRK_FAMILIES = ("qwen_1_5", "qwen_2", "qwen_2_5", "llava_llama_3")


def conversation(final_user: bool) -> Conversation:
    turns = [Turn(USER, QUESTION_1), Turn(ASSISTANT, ANSWER_1), Turn(USER, QUESTION_2)]
    if not final_user:
        turns.append(Turn(ASSISTANT, ANSWER_2))
    return Conversation(tuple(turns))


def upstream_prompt(template_id: str, messages: list, tokenizer) -> str:
    conv = upstream.conv_templates[template_id].copy()
    conv.tokenizer = tokenizer
    for number, message in enumerate(messages):
        conv.append_message(conv.roles[number % 2], message)
    return conv.get_prompt()


def rendered(
    template_id: str, conv: Conversation, tokenizer, for_generation: bool, quirks: bool = True
) -> str:
    template = get_template(template_id, upstream_quirks=quirks)
    return "".join(s.text for s in template.render(conv, for_generation=for_generation, tokenizer=tokenizer))


def supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_registry_has_every_template():
    expected = set(FAMILY) | {"plain", "tokenizer", "processor"}
    assert set(TEMPLATES.names()) == expected
    with pytest.raises(ConfigError, match="valid chat template ids"):
        get_template("vicuna")


@pytest.mark.parametrize("template_id", sorted(FAMILY))
def test_generation_prompt_equals_upstream(template_id, tokenizers):
    tokenizer = tokenizers[FAMILY[template_id]]
    expected = upstream_prompt(template_id, [QUESTION_1, ANSWER_1, QUESTION_2, None], tokenizer)
    assert rendered(template_id, conversation(final_user=True), tokenizer, for_generation=True) == expected


@pytest.mark.parametrize("template_id", sorted(set(FAMILY) - {"llava_llama_3"}))
def test_training_prompt_equals_upstream(template_id, tokenizers):
    # Upstream's LLAMA_3 get_prompt always appends a generation prompt; its training text is checked below.
    tokenizer = tokenizers[FAMILY[template_id]]
    expected = upstream_prompt(template_id, [QUESTION_1, ANSWER_1, QUESTION_2, ANSWER_2], tokenizer)
    if template_id == "qwen_2_5":
        # Quirk: upstream trains qwen_2_5 with preprocess_qwen's hard-coded system prompt.
        expected = expected.replace(upstream.conv_qwen_2_5.system, upstream.conv_qwen.system)
    assert rendered(template_id, conversation(final_user=False), tokenizer, for_generation=False) == expected


@pytest.mark.parametrize("template_id", sorted(set(FAMILY) - set(QUIRK_FAMILIES)))
def test_ids_equal_upstream_tokenization(template_id, tokenizers):
    tokenizer = tokenizers[FAMILY[template_id]]
    prompt = upstream_prompt(template_id, [QUESTION_1, ANSWER_1, QUESTION_2, ANSWER_2], tokenizer)
    encoded = SampleEncoder(tokenizer, get_template(template_id)).encode(conversation(final_user=False), [1])
    assert encoded.input_ids == tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("template_id", sorted(FAMILY))
def test_supervised_tokens_are_replies_plus_end_of_turn(template_id, tokenizers):
    tokenizer = tokenizers[FAMILY[template_id]]
    encoder = SampleEncoder(tokenizer, get_template(template_id, upstream_quirks=False))
    encoded = encoder.encode(conversation(final_user=False), [3])
    before, after = REPLY_FRAME[template_id]
    expected = [
        tokenizer(before + reply + after, add_special_tokens=False)["input_ids"]
        for reply in (ANSWER_1, ANSWER_2)
    ]
    assert supervised_runs(encoded.labels) == expected
    assert [encoded.labels[i] for i in range(len(encoded.labels)) if encoded.labels[i] != IGNORE_INDEX] == [
        encoded.input_ids[i] for i in range(len(encoded.labels)) if encoded.labels[i] != IGNORE_INDEX
    ]


def upstream_source():
    return [
        {"from": "human", "value": QUESTION_1},
        {"from": "gpt", "value": ANSWER_1},
        {"from": "human", "value": QUESTION_2},
        {"from": "gpt", "value": ANSWER_2},
    ]


@pytest.mark.parametrize("template_id", ["qwen_1_5", "qwen_2", "qwen_2_5"])
def test_qwen_quirk_masks_equal_preprocess_qwen(template_id, tokenizers):
    tokenizer = tokenizers["qwen2"]
    newline_id = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    ids, labels = upstream.preprocess_qwen(upstream_source(), tokenizer, newline_id)
    encoded = SampleEncoder(tokenizer, get_template(template_id)).encode(conversation(final_user=False), [1])
    assert encoded.input_ids == ids
    assert encoded.labels == labels


def test_llama3_quirk_masks_equal_preprocess_llama3(tokenizers):
    tokenizer = tokenizers["llama3"]
    ids, labels = upstream.preprocess_llama3(upstream_source(), tokenizer)
    encoded = SampleEncoder(tokenizer, get_template("llava_llama_3")).encode(
        conversation(final_user=False), [1]
    )
    assert encoded.input_ids == ids
    assert encoded.labels == labels


def test_plain_equals_preprocess_plain(tokenizers):
    tokenizer = tokenizers["llama"]
    conv = Conversation((Turn(USER, "<image>\nDescribe the image."), Turn(ASSISTANT, ANSWER_1)))
    encoded = SampleEncoder(tokenizer, get_template("plain")).encode(conv, [1])
    # Upstream: "<image>" + caption + "\n", BOS and image masked.
    expected_ids = tokenizer("<image>" + ANSWER_1 + "\n")["input_ids"]
    prompt_len = len(tokenizer("<image>")["input_ids"])
    assert encoded.input_ids == expected_ids
    assert encoded.labels == [IGNORE_INDEX] * prompt_len + expected_ids[prompt_len:]


def test_tokenizer_template_supervises_assistant_messages(tokenizers):
    tokenizer = tokenizers["qwen2"]
    encoded = SampleEncoder(tokenizer, get_template("tokenizer")).encode(conversation(final_user=False), [2])
    full = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": QUESTION_1},
            {"role": "assistant", "content": ANSWER_1},
            {"role": "user", "content": QUESTION_2},
            {"role": "assistant", "content": ANSWER_2},
        ],
        tokenize=False,
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert encoded.input_ids == tokenizer(full.replace("<image>", "<image><image>"))["input_ids"]
    expected = [
        tokenizer(reply + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        for reply in (ANSWER_1, ANSWER_2)
    ]
    assert supervised_runs(encoded.labels) == expected
    assert encoded.input_ids.count(image_id) == 2


def test_image_placeholder_expands_to_token_count(tokenizers):
    tokenizer = tokenizers["llama"]
    encoded = SampleEncoder(tokenizer, get_template("vicuna_v1")).encode(conversation(final_user=False), [7])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ((start, length),) = encoded.image_spans
    assert length == 7 and encoded.input_ids[start : start + 7] == [image_id] * 7
    assert encoded.labels[start : start + 7] == [IGNORE_INDEX] * 7
    assert encoded.input_ids.count(image_id) == 7


def test_placeholder_count_mismatch_is_an_error(tokenizers):
    encoder = SampleEncoder(tokenizers["llama"], get_template("vicuna_v1"))
    with pytest.raises(DataError, match="1 <image> placeholders but 2 images"):
        encoder.encode(conversation(final_user=False), [3, 3])


def test_gemma_rejects_system_prompt(tokenizers):
    conv = Conversation((Turn(USER, "hi"), Turn(ASSISTANT, "yes")), system="Be brief.")
    with pytest.raises(DataError, match="no system role"):
        get_template("gemma_instruct").render(conv)


def test_sample_system_prompt_replaces_default(tokenizers):
    conv = Conversation((Turn(USER, "hi"), Turn(ASSISTANT, "yes")), system="Be brief.")
    text = "".join(s.text for s in get_template("vicuna_v1").render(conv))
    assert text.startswith("Be brief. USER: hi")


@pytest.mark.parametrize("quirks", [True, False])
def test_qwen_sample_system_prompt_is_kept_in_training(quirks):
    conv = Conversation((Turn(USER, "hi"), Turn(ASSISTANT, "yes")), system="Be brief.")
    text = "".join(s.text for s in get_template("qwen_2_5", upstream_quirks=quirks).render(conv))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


def test_render_for_display_marks_supervised_spans(tokenizers):
    encoder = SampleEncoder(tokenizers["llama"], get_template("vicuna_v1"))
    shown = encoder.render_for_display(encoder.encode(conversation(final_user=False), [5]))
    assert f"⟦ {ANSWER_1}</s>⟧" in shown and f"⟦ {ANSWER_2}</s>⟧" in shown and "<image×5>" in shown


@pytest.mark.parametrize("template_id", ["vicuna_v1", "llava_v1", "llama_2", "mistral_instruct"])
@pytest.mark.parametrize("for_generation", [True, False])
def test_configured_system_prompt_equals_upstream_with_its_system_replaced(template_id, for_generation, tokenizers):
    conv = upstream.conv_templates[template_id].copy()
    conv.system = "Answer the questions."
    conv.tokenizer = tokenizers["llama"]
    messages = [QUESTION_1, ANSWER_1, QUESTION_2] + ([None] if for_generation else [ANSWER_2])
    for number, message in enumerate(messages):
        conv.append_message(conv.roles[number % 2], message)
    template = get_template(template_id, system_prompt="Answer the questions.")
    ours = template.render(conversation(final_user=for_generation), for_generation=for_generation)
    assert "".join(s.text for s in ours) == conv.get_prompt()


def test_a_sample_system_turn_wins_over_the_configured_system_prompt():
    conv = Conversation((Turn(USER, "hi"), Turn(ASSISTANT, "yes")), system="Be brief.")
    template = get_template("vicuna_v1", system_prompt="Answer the questions.")
    assert "".join(s.text for s in template.render(conv)).startswith("Be brief. USER: hi")


def test_configured_system_prompt_reaches_the_tokenizer_chat_template(tokenizers):
    tokenizer = tokenizers["qwen2"]
    conv = Conversation((Turn(USER, QUESTION_1), Turn(ASSISTANT, ANSWER_1)))
    ours = get_template("tokenizer", system_prompt="Answer the questions.").render(conv, tokenizer=tokenizer)
    messages = [
        {"role": "system", "content": "Answer the questions."},
        {"role": "user", "content": QUESTION_1},
        {"role": "assistant", "content": ANSWER_1},
    ]
    assert "".join(s.text for s in ours) == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize(
    ("template_id", "quirks", "system", "refused"),
    [
        ("plain", True, "Answer the questions.", "no system prompt; remove"),
        ("gemma_instruct", True, "Answer the questions.", "no system role; remove"),
        ("qwen_2", True, "Answer the questions.", "hard-codes 'You are a helpful assistant.'; remove"),
        ("tokenizer", True, "", "the tokenizer's chat_template picks its default"),
        ("qwen_2", False, "Answer the questions.", None),
    ],
)
def test_a_system_prompt_training_would_ignore_is_refused(template_id, quirks, system, refused):
    template = get_template(template_id, upstream_quirks=quirks, system_prompt=system)
    if refused:
        with pytest.raises(ConfigError, match=f"stages.1: template '{template_id}' ignores .*{refused}"):
            check_system_prompt(template, "stages.1")
    else:
        check_system_prompt(template)
        conv = Conversation((Turn(USER, "hi"), Turn(ASSISTANT, "yes")))
        text = "".join(s.text for s in template.render(conv))
        assert text.startswith("<|im_start|>system\nAnswer the questions.<|im_end|>")
