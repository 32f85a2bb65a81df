"""Video placeholders in `SampleEncoder`: each ``<video>`` expands to its token count like ``<image>``, with label
-100, for every template; counts must match; a tokenizer without ``<video>`` refuses videos."""

from __future__ import annotations

import copy

import pytest

from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.data.templates import get_template
from llavakit.data.tokenize import IGNORE_INDEX, SampleEncoder
from llavakit.errors import ConfigError, DataError
from llavakit.model.tokenizer import ensure_video_token

TEMPLATES = {"llama": "vicuna_v1", "qwen2": "qwen_1_5", "llama3": "llava_llama_3", "gemma": "gemma_instruct"}


def _conversation(question: str) -> Conversation:
    return Conversation((Turn(USER, question), Turn(ASSISTANT, "A red circle moves right.")))


@pytest.fixture(scope="module")
def video_tokenizers(tokenizers):
    with_video = {name: copy.deepcopy(tokenizer) for name, tokenizer in tokenizers.items()}
    for tokenizer in with_video.values():
        ensure_video_token(tokenizer)
    return with_video


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_videos_and_images_expand_in_placeholder_order(video_tokenizers, family):
    encoder = SampleEncoder(video_tokenizers[family], get_template(TEMPLATES[family]))
    question = "<image>\nFirst a photo, then <video>\nand another clip: <video>\nWhat happens?"
    encoded = encoder.encode(_conversation(question), [3], video_token_counts=[5, 2])
    video, image = encoder.video_token_id, encoder.image_token_id
    assert [length for _, length in encoded.video_spans] == [5, 2]
    assert [length for _, length in encoded.image_spans] == [3]
    for spans, token in ((encoded.video_spans, video), (encoded.image_spans, image)):
        for start, length in spans:
            assert encoded.input_ids[start : start + length] == [token] * length
            assert encoded.labels[start : start + length] == [IGNORE_INDEX] * length
    assert encoded.input_ids.count(video) == 7 and encoded.input_ids.count(image) == 3
    assert encoded.image_spans[0][0] < encoded.video_spans[0][0] < encoded.video_spans[1][0]
    # Supervision is as without the placeholders (templates that always train "\n" see the same newlines).
    plain = encoder.encode(_conversation(question.replace("<image>", "").replace("<video>", "")), [])
    assert encoded.num_supervised == plain.num_supervised > 0
    shown = encoder.render_for_display(encoded)
    assert "<image×3>" in shown and shown.index("<video×5>") < shown.index("<video×2>")


def test_counts_must_match_and_video_needs_the_token(tokenizers, video_tokenizers):
    encoder = SampleEncoder(video_tokenizers["qwen2"], get_template("qwen_1_5"))
    with pytest.raises(DataError, match="has 1 <video> placeholders but 2 videos were given"):
        encoder.encode(_conversation("<video>\nWhat happens?"), [], video_token_counts=[4, 4])
    with pytest.raises(DataError, match="has 1 <video> placeholders but 0 videos were given"):
        encoder.encode(_conversation("<video>\nWhat happens?"), [])
    image_only = SampleEncoder(tokenizers["qwen2"], get_template("qwen_1_5"))
    assert image_only.video_token_id is None
    with pytest.raises(ConfigError, match="no <video> token: the model was built without video"):
        image_only.encode(_conversation("<video>\nWhat happens?"), [], video_token_counts=[4])
    # Without the token, "<video>" is ordinary text.
    assert image_only.encode(_conversation("<video> is text"), []).video_spans == []


def test_video_text_in_a_reply_is_ordinary_text_without_the_token(tokenizers, video_tokenizers):
    answer = Conversation((Turn(USER, "How do I embed a clip?"), Turn(ASSISTANT, "Use the <video> element.")))
    image_only = SampleEncoder(tokenizers["qwen2"], get_template("qwen_1_5"))
    assert image_only.encode(answer, []).num_supervised > 0
    with pytest.raises(DataError, match="placeholder landed in a supervised span"):
        SampleEncoder(video_tokenizers["qwen2"], get_template("qwen_1_5")).encode(answer, [])
