"""Videos through the real server on 127.0.0.1 with the real openai client: ``video_url`` parts (vLLM's name).

The answer equals `Assistant.generate` on the same video (the in-process path, tested against hand-built inputs in
tests/inference/test_inference_video.py); refusals are OpenAI-style 400s naming the part: a model without video,
bytes that are not a video, a video above ``max_video_bytes``, a local path on a server that reads no local files.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import openai
import pytest
import torch

import llavakit
from llavakit.anyres.video_spec import VideoSpec
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.presets import build_parts

av = pytest.importorskip("av")

from video_helpers import encode_video  # noqa: E402  (needs av)

NEW_TOKENS = 5


def video_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("served_video")
    parts = build_parts("debug-siglip-qwen2", root / "parts", tile_size=40)
    kwargs = parts.from_parts_kwargs()
    kwargs["image_spec"] = replace(kwargs["image_spec"], aspect_ratio="anyres_max_2")
    torch.manual_seed(0)
    model = LlavaNextModel.from_parts(**kwargs, video_spec=VideoSpec(frames_upbound=4))
    return model.save_pretrained(root / "ckpt")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode_video(tmp_path_factory.mktemp("clip") / "clip.mp4", 16, fps=4, noise=True)


@pytest.fixture(scope="module")
def video_server(video_checkpoint, checkpoint, clip):
    from llavakit.serving.config import ModelSpec, ServeConfig
    from llavakit.serving.server import BackgroundServer

    config = ServeConfig(
        models=(ModelSpec("video", str(video_checkpoint)), ModelSpec("image-only", str(checkpoint))),
        port=0,
        max_video_bytes=clip.stat().st_size + 10,
        max_body_bytes=2 * 1024**2,
    )
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def video_client(video_server):
    return openai.OpenAI(base_url=video_server.base_url, api_key="unused", max_retries=0, timeout=120)


def _ask(client, model: str, part: dict, text: str = "What happens?", **options):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": text}]}],
        max_tokens=NEW_TOKENS,
        temperature=0,
        **options,
    )


def _video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def test_video_url_answer_equals_the_in_process_answer(video_client, video_checkpoint, clip):
    reply = _ask(video_client, "video", _video_part(video_url(clip.read_bytes())))
    assistant = llavakit.load(video_checkpoint, device="cpu", max_new_tokens=NEW_TOKENS)
    (expected,) = assistant.generate(["What happens?"], videos=[[str(clip)]])
    assert reply.choices[0].message.content == expected
    prompt = assistant.prompts.encode(
        llavakit.inference.prompts.Request(
            llavakit.data.schema.Conversation((llavakit.data.schema.Turn("user", "<video>\nWhat happens?"),)),
            (),
            (str(clip),),
        )
    )
    assert reply.usage.prompt_tokens == len(prompt.input_ids)
    streamed = _ask(video_client, "video", _video_part(video_url(clip.read_bytes())), stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected


def _refusal(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def test_bad_videos_are_refused_with_openai_errors(video_client, clip):
    data = clip.read_bytes()
    cases = [
        ("image-only", video_url(data), "video_not_supported", "takes no videos"),
        ("video", video_url(b"not a video at all" * 20), "invalid_video_format", "video_url 'data:video/mp4"),
        ("video", video_url(data + b"\0" * 64), "video_too_large", "above this server's limit"),
        ("video", video_url(data, "image/png"), "invalid_video_format", "must be video/*"),
        ("video", str(clip), "invalid_video_url", "does not read local files"),
    ]
    for model, url, code, message in cases:
        error = _refusal(lambda model=model, url=url: _ask(video_client, model, _video_part(url)))
        body = error.body
        assert body["code"] == code and message in body["message"], body
        # the server's temporary copy of the bytes is never named
        assert (
            body["param"] == "messages[0].content[0].video_url" and "llavakit-video-" not in body["message"]
        )
    error = _refusal(lambda: _ask(video_client, "video", _video_part(video_url(data)), text="see <video>"))
    assert "reserved for videos" in error.body["message"]
    two = [_video_part(video_url(data)), _video_part(video_url(data)), {"type": "text", "text": "Compare."}]
    error = _refusal(
        lambda: video_client.chat.completions.create(
            model="video", messages=[{"role": "user", "content": two}], max_tokens=2
        )
    )
    assert error.body["code"] == "too_many_videos"


def test_a_video_sampled_to_too_many_frames_is_refused_before_decoding(clip, monkeypatch):
    from llavakit.serving import media

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a video the frame limit refuses")

    policy = media.MediaPolicy(max_video_frames=3)
    # A 16-frame clip at 4 fps, sampled at 1 fps with no frames_upbound: 4 frames.
    unbounded = VideoSpec(frames_upbound=0)
    monkeypatch.setattr(media, "load_video", no_decoding)
    with pytest.raises(media.MediaError, match="sampled to 4 frames, above this server's limit of 3") as caught:
        media.load_video_url(video_url(clip.read_bytes()), policy, unbounded)
    assert caught.value.code == "video_too_large"
    monkeypatch.undo()
    video = media.load_video_url(video_url(clip.read_bytes()), policy, VideoSpec(frames_upbound=3))
    assert len(video.frames) == 3
