"""Video at inference time: `Assistant.generate` / `chat` with videos, the chat REPL's ``/video`` and ``--video``.

The oracle for every answer is greedy generation on inputs built here by hand, from the pieces training uses
(`load_video` + `process_frames` for pixels, `SampleEncoder` for ids, the prompt text written out): so the checks
cover what inference adds (placeholder lines, token counts, the time instruction's text and place, batch order
and left padding). The tiny SigLIP/Qwen2 model takes 40 px frames; videos are solid-colour PyAV encodes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.anyres.video import load_video, process_frames, time_instruction
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.errors import DataError, VideoError
from llavakit.inference.chat import ChatSession, run_chat
from llavakit.inference.generate import SamplingParams, generate_ids
from llavakit.inference.prompts import Request
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.presets import build_parts

av = pytest.importorskip("av")

from video_helpers import encode_video  # noqa: E402  (needs av)

TILE = 40
NEW_TOKENS = 6
PLAIN = VideoSpec(frames_upbound=4)
TIMED = VideoSpec(frames_upbound=3, force_sample=True, newline="grid", add_time_instruction=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts("debug-siglip-qwen2", tmp_path_factory.mktemp("video_parts"), tile_size=TILE)


def _checkpoint(parts, folder, spec: VideoSpec):
    kwargs = parts.from_parts_kwargs()
    kwargs["image_spec"] = replace(kwargs["image_spec"], aspect_ratio="anyres_max_2")
    torch.manual_seed(3)
    return LlavaNextModel.from_parts(**kwargs, video_spec=spec).save_pretrained(folder)


@pytest.fixture(scope="module")
def video_checkpoint(parts, tmp_path_factory):
    return _checkpoint(parts, tmp_path_factory.mktemp("plain") / "ckpt", PLAIN)


@pytest.fixture(scope="module")
def assistant(video_checkpoint):
    return llavakit.load(video_checkpoint, device="cpu", max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def timed(parts, tmp_path_factory):
    path = _checkpoint(parts, tmp_path_factory.mktemp("timed") / "ckpt", TIMED)
    return llavakit.load(path, device="cpu", max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [str(encode_video(folder / "long.mp4", 24, fps=4, noise=True)), str(encode_video(folder / "short.mp4", 6, fps=2, noise=True))]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "p.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def _hand_inputs(assistant, text: str, videos: list[str]) -> dict[str, torch.Tensor]:
    """Model inputs for one user message ``text`` (placeholders written in) and its videos, built without the
    inference modules: frames as training reads them, ids from the training encoder."""
    model = assistant.model
    spec, image_spec = model.config.video_spec, model.config.image_spec
    pixels = [process_frames(load_video(path, spec).frames, image_spec, spec) for path in videos]
    counts = [spec.count_tokens(len(p), image_spec.grid_side) for p in pixels]
    encoded = assistant.prompts.encoder.encode(
        Conversation((Turn(USER, text),)), [], for_generation=True, video_token_counts=counts
    )
    return {
        "input_ids": torch.tensor([encoded.input_ids]),
        "pixel_values_videos": torch.cat(pixels),
        "video_frames": torch.tensor([len(p) for p in pixels]),
    }


def _by_hand(assistant, text: str, videos: list[str]) -> torch.Tensor:
    """Greedy ids (`LlavaNextModel.generate`) for the `_hand_inputs`."""
    return assistant.model.generate(
        **_hand_inputs(assistant, text, videos),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=assistant.stop_ids,
        pad_token_id=assistant.prompts.pad_token_id,
    )[0]


def _same_inputs(assistant, request: Request, text: str) -> None:
    """The batch inference builds for ``request`` holds exactly the hand-built ids and frames."""
    hand = _hand_inputs(assistant, text, list(request.videos))
    batch = assistant.prompts.batch([request])
    assert torch.equal(batch.input_ids, hand["input_ids"])
    assert torch.equal(torch.cat([video.pixels for video in batch.videos]), hand["pixel_values_videos"])
    assert [video.num_frames for video in batch.videos] == hand["video_frames"].tolist()


def _ids(assistant, requests: list[Request]) -> torch.Tensor:
    batch = assistant.prompts.batch(requests)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    return generate_ids(assistant.model, batch, params, assistant.stop_ids, assistant.prompts.pad_token_id)


def _request(text: str, images=(), videos=()) -> Request:
    return Request(Conversation((Turn(USER, text),)), tuple(images), tuple(videos))


def _text(assistant, ids: torch.Tensor) -> str:
    (answer,) = llavakit.inference.generate.decode(assistant.tokenizer, ids[None], assistant.template)
    return answer


def test_answer_equals_greedy_generation_on_hand_built_inputs(assistant, clips):
    text = "<video>\nWhat happens in the video?"
    _same_inputs(assistant, _request(text, videos=[clips[0]]), text)
    expected = _by_hand(assistant, text, [clips[0]])
    ids = _ids(assistant, [_request(text, videos=[clips[0]])])[0]
    assert torch.equal(ids[: len(expected)], expected)
    (answer,) = assistant.generate(["What happens in the video?"], videos=[[clips[0]]])
    assert answer == _text(assistant, expected)
    # the frames reach the LLM: another clip moves the next-token logits
    with torch.no_grad():
        first, second = (
            assistant.model(**_hand_inputs(assistant, text, [clip])).logits[0, -1] for clip in clips
        )
    assert (first - second).abs().max() > 1e-4


def test_placeholder_in_the_text_is_kept_where_it_is(assistant, clips):
    text = "Watch this: <video> and say what moves."
    _same_inputs(assistant, _request(text, videos=[clips[1]]), text)
    expected = _by_hand(assistant, text, [clips[1]])
    assert torch.equal(_ids(assistant, [_request(text, videos=[clips[1]])])[0][: len(expected)], expected)
    (answer,) = assistant.generate([text], videos=[[clips[1]]])
    assert answer == _text(assistant, expected)


def test_time_instruction_has_trainings_text_and_place(timed, clips):
    spec = timed.model.config.video_spec
    video = load_video(clips[0], spec)
    written = f"<video>\n{time_instruction(video)}\n\nWhat happens?"
    _same_inputs(timed, _request("<video>\nWhat happens?", videos=[clips[0]]), written)
    expected = _by_hand(timed, written, [clips[0]])
    (answer,) = timed.generate(["What happens?"], videos=[[clips[0]]])
    assert answer == _text(timed, expected)
    ids = _ids(timed, [_request("<video>\nWhat happens?", videos=[clips[0]])])[0]
    assert torch.equal(ids[: len(expected)], expected)
    assert "3 frames are uniformly sampled" in time_instruction(video)


@pytest.mark.parametrize("mark", ["<video>", "<image>"])  # upstream's records mark videos with <image>
def test_time_instruction_matches_the_training_pipeline(timed, clips, mark):
    """The user turn inference builds is the one training parses from an upstream record of the same exchange."""
    from llavakit.data.formats import Record, parse_sample
    from llavakit.inference.videos import with_time_instruction

    instruction = time_instruction(load_video(clips[0], timed.model.config.video_spec))
    record = Record(
        "test:1",
        {
            "id": "s",
            "video": clips[0],
            "conversations": [
                {"from": "human", "value": f"{mark}\nWhat happens?"},
                {"from": "gpt", "value": "A fade."},
            ],
        },
    )
    trained = parse_sample(record, instruction).conversation.turns[0].text
    request = _request("<video>\nWhat happens?", videos=[clips[0]])
    assert with_time_instruction(request.conversation, instruction).turns[0].text == trained
    video_id = timed.model.config.video_token_id
    decoded = timed.tokenizer.decode(
        [token for token in timed.prompts.encode(request).input_ids if token != video_id]
    )
    # the video tokens, dropped here, sit between "user\n" and their line break
    assert f"<|im_start|>user\n\n{instruction}\n\nWhat happens?<|im_end|>" in decoded


def test_time_instruction_model_refuses_two_videos(timed, clips):
    with pytest.raises(DataError, match="one video per conversation"):
        timed.generate(["<video>\n<video>\nCompare."], videos=[clips])


def test_mixed_batch_equals_each_request_alone(assistant, clips, picture):
    prompts = ["<image>\nWhat is in the picture?", "What happens?", "Say hello.", "<image>\nCompare them."]
    images = [[picture], [], [], [picture]]
    videos = [[], [clips[0]], [], [clips[1]]]
    together = assistant.generate(prompts, images=images, videos=videos)
    alone = [assistant.generate([p], images=[i], videos=[v])[0] for p, i, v in zip(prompts, images, videos)]
    assert together == alone
    requests = [
        _request(p if not v or "<video>" in p else "<video>\n" + p, i, v)
        for p, i, v in zip(prompts, images, videos)
    ]
    batch = assistant.prompts.batch(requests)
    assert [video.num_frames for video in batch.videos] == [
        4,
        3,
    ]  # row order: the long clip, then the short one
    assert (batch.attention_mask[:, -1] == 1).all()  # padded on the left
    ids = _ids(assistant, requests)
    for row, request in enumerate(requests):
        single = _ids(assistant, [request])[0]
        assert torch.equal(ids[row][: len(single)], single)


def test_chat_reads_its_video_once_and_keeps_it(assistant, clips):
    answer, history = assistant.chat(None, "What happens?", video=clips[0])
    assert isinstance(history.videos[0], llavakit.anyres.video.Video) and history.turns[0].text.startswith(
        "<video>\n"
    )
    assert answer == _text(assistant, _by_hand(assistant, "<video>\nWhat happens?", [clips[0]]))
    follow_up, history = assistant.chat(None, "And then?", history=history)
    conversation = Conversation(
        (Turn(USER, "<video>\nWhat happens?"), Turn(ASSISTANT, answer), Turn(USER, "And then?"))
    )
    (expected,) = assistant.generate_requests([Request(conversation, (), (clips[0],))])
    assert follow_up == expected and len(history.turns) == 4


def test_bad_videos_and_models_without_video(assistant, checkpoint, clips, tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoError, match="does not exist"):
        assistant.generate(["What?"], videos=[[str(missing)]])
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(VideoError, match="notes.mp4"):
        assistant.chat(None, "What?", video=str(not_a_video))
    with pytest.raises(DataError, match="2 <video> placeholders but 1 videos"):
        assistant.generate(["<video> <video> What?"], videos=[[clips[0]]])
    with pytest.raises(DataError, match="2 video lists"):
        assistant.generate(["What?"], videos=[[clips[0]], []])
    image_only = llavakit.load(checkpoint, device="cpu", max_new_tokens=2)
    with pytest.raises(DataError, match="takes no videos"):
        image_only.generate(["What?"], videos=[[clips[0]]])
    with pytest.raises(DataError, match="takes no videos"):
        image_only.chat(None, "What?", video=clips[0])


def test_chat_session_video_command(assistant, checkpoint, clips, tmp_path):
    output = io.StringIO()
    lines = [f"/video {tmp_path / 'missing.mp4'}\n", f"/video {clips[0]}\n", "What happens?\n", "And then?\n"]
    assert run_chat(assistant, lines, output) == 0
    text = output.getvalue()
    assert text.count("error:") == 1 and "does not exist" in text and "4 frames; new conversation" in text
    assert text.count("assistant> ") == 2
    session = ChatSession(llavakit.load(checkpoint, device="cpu", max_new_tokens=2), io.StringIO())
    assert not session.set_video(clips[0]) and "takes no videos" in session.output.getvalue()


def test_cli_chat_with_video(video_checkpoint, checkpoint, clips, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "llavakit.cli.main", "chat", "--max-new-tokens", "3"]
    done = subprocess.run(
        [*command, "--model", str(video_checkpoint), "--video", clips[0]],
        input="What happens?\n/video " + clips[1] + "\nAnd this one?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 2 and "error:" not in done.stdout
    for model, video, message in (
        (video_checkpoint, str(tmp_path / "missing.mp4"), "does not exist"),
        (checkpoint, clips[0], "takes no videos"),
    ):
        failed = subprocess.run(
            [*command, "--model", str(model), "--video", video],
            input="What happens?\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert failed.returncode == 2 and message in failed.stderr and "assistant>" not in failed.stdout
