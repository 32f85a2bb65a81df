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
    # For a model without video, "<video>" is ordinary text (as in its training data).
    reply = video_client.chat.completions.create(
        model="image-only", messages=[{"role": "user", "content": "What does <video> do in HTML?"}], max_tokens=2
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
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


# --- untrusted videos: work, memory, demuxers and decoders bounded before (and while) decoding -------------------


def _two_sizes(path, first: int, second: int, frames: int = 4):
    """A Matroska H.264 clip whose header says ``first``x``first`` and whose stream switches to ``second`` squares
    after ``frames`` frames (a new SPS mid-stream), ``2 * frames`` frames in all."""
    import io
    from fractions import Fraction

    import numpy as np

    def annex_b(side: int) -> bytes:
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="h264") as raw:
            stream = raw.add_stream("libx264", rate=Fraction(4))
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for _ in range(frames):
                image = np.full((side, side, 3), 100, np.uint8)
                raw.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            raw.mux(stream.encode())
        return buffer.getvalue()

    source = path.with_suffix(".h264")
    source.write_bytes(annex_b(first) + annex_b(second))
    with av.open(str(source)) as raw, av.open(str(path), "w") as muxed:
        out = muxed.add_stream_from_template(raw.streams.video[0])
        packets = (packet for packet in raw.demux(raw.streams.video[0]) if packet.size)
        for index, packet in enumerate(packets):  # raw H.264 has no timestamps
            packet.stream, packet.time_base, packet.pts, packet.dts = out, Fraction(1, 4), index, index
            packet.duration = 1
            muxed.mux(packet)
    return path


def _no_decoding(*args, **kwargs):
    raise AssertionError("reached a decoding step the check should have refused before")


@pytest.fixture(scope="module")
def strict_server(video_checkpoint):
    """A server with small video limits: 40 source frames, 20 frames of 32x32 pixels to decode."""
    from llavakit.serving.config import ModelSpec, ServeConfig
    from llavakit.serving.server import BackgroundServer

    config = ServeConfig(
        models=(ModelSpec("video", str(video_checkpoint)),),
        port=0,
        max_video_source_frames=40,
        max_video_decoded_pixels=20 * 32 * 32,
    )
    with BackgroundServer(config) as running:
        yield openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=120)


def test_long_and_large_videos_are_refused_by_the_server_before_decoding(strict_server, tmp_path):
    many = encode_video(tmp_path / "many.mkv", 41, fps=30)  # 41 tiny frames: over 40 source frames
    over_budget = encode_video(tmp_path / "over.mkv", 21, fps=30)  # 21 x 32 x 32 pixels: over 20 x 32 x 32
    cases = [
        (many, "has more than 40 frames, above this server's limit of 40 frames per video"),
        (over_budget, f"({21 * 32 * 32} pixels to decode), above this server's limit of {20 * 32 * 32} decoded"),
    ]
    for clip, message in cases:
        error = _refusal(lambda clip=clip: _ask(strict_server, "video", _video_part(video_url(clip.read_bytes()))))
        assert error.body["code"] == "video_too_large" and message in error.body["message"], error.body
        assert error.body["param"] == "messages[0].content[0].video_url"
    within = encode_video(tmp_path / "within.mkv", 20, fps=30)
    reply = _ask(strict_server, "video", _video_part(video_url(within.read_bytes())))
    assert reply.usage.completion_tokens > 0


def test_source_frame_and_pixel_bounds_refuse_before_any_frame_is_decoded(tmp_path, monkeypatch):
    from llavakit.serving import media

    clip = video_url(encode_video(tmp_path / "many.mp4", 300, fps=30).read_bytes())
    monkeypatch.setattr(media, "probe_video", _no_decoding)
    monkeypatch.setattr(media, "load_video", _no_decoding)
    spec = VideoSpec(frames_upbound=4)
    with pytest.raises(media.MediaError, match="more than 299 frames, above this server's limit of 299") as caught:
        media.load_video_url(clip, media.MediaPolicy(max_video_source_frames=299), spec)
    assert caught.value.code == "video_too_large"
    monkeypatch.undo()
    monkeypatch.setattr(media, "load_video", _no_decoding)  # the budgets need the probe, never the decoder
    for policy, message in [
        (media.MediaPolicy(max_video_decoded_pixels=300 * 32 * 32 - 1), "pixels to decode"),
        (media.MediaPolicy(max_video_sampled_pixels=4 * 32 * 32 - 1), "would keep 4 sampled frames of 1024 pixels"),
    ]:
        with pytest.raises(media.MediaError, match=message) as caught:
            media.load_video_url(clip, policy, spec)
        assert caught.value.code == "video_too_large"
    monkeypatch.undo()
    exact = media.MediaPolicy(
        max_video_source_frames=300, max_video_decoded_pixels=300 * 32 * 32, max_video_sampled_pixels=4 * 32 * 32
    )
    assert len(media.load_video_url(clip, exact, spec).frames) == 4


def test_the_decode_deadline_is_checked_while_frames_decode(clip, monkeypatch):
    from llavakit.serving import media

    clock = {"now": 0.0, "decoding": False}
    real_load_video = media.load_video

    def load_video(*args, **kwargs):
        clock["decoding"] = True
        return real_load_video(*args, **kwargs)

    def monotonic() -> float:
        # time stands still until decoding starts, then each reading is a second later
        clock["now"] += 1.0 if clock["decoding"] else 0.0
        return clock["now"]

    monkeypatch.setattr(media, "load_video", load_video)
    monkeypatch.setattr(media, "time", type("Clock", (), {"monotonic": staticmethod(monotonic)}))
    policy = media.MediaPolicy(video_decode_timeout_s=2.5)
    with pytest.raises(media.MediaError, match="took more than 2.5 s to read, above this server's limit") as caught:
        media.load_video_url(video_url(clip.read_bytes()), policy, VideoSpec(frames_upbound=4))
    assert caught.value.code == "video_too_large" and clock["decoding"] and clock["now"] == 3.0
    monkeypatch.undo()
    with pytest.raises(media.MediaError, match="took more than 1e-09 s") as caught:  # a real clock, a tiny budget
        media.load_video_url(video_url(clip.read_bytes()), replace(policy, video_decode_timeout_s=1e-9), VideoSpec())
    assert caught.value.code == "video_too_large"


def test_frames_are_checked_as_they_decode_when_the_resolution_changes_mid_stream(tmp_path):
    from llavakit.serving import media

    # header 32x32, frames 4-7 are 64x64; frames_upbound 4 samples 0, 2, 4, 7 (1024 + 1024 + 4096 + 4096 pixels)
    grows = video_url(_two_sizes(tmp_path / "grows.mkv", 32, 64).read_bytes())
    spec = VideoSpec(frames_upbound=4, force_sample=True)
    assert [frame.size for frame in media.load_video_url(grows, media.MediaPolicy(), spec).frames] == [
        (32, 32), (32, 32), (64, 64), (64, 64)
    ]  # fmt: skip
    with pytest.raises(media.MediaError, match="a 64x64 \\(WxH\\) frame at frame 4, above .* 1024 pixels per frame"):
        media.load_video_url(grows, media.MediaPolicy(max_image_pixels=1024), spec)
    kept = media.MediaPolicy(max_video_sampled_pixels=5000)  # the header's 4 x 1024 fits, the decoded frames not
    with pytest.raises(media.MediaError, match="frames grow mid-stream, to 64x64 at frame 4") as caught:
        media.load_video_url(grows, kept, spec)
    assert caught.value.code == "video_too_large"
    # far above the limit, FFmpeg's own max_pixels refuses the frame before allocating it
    huge = video_url(_two_sizes(tmp_path / "huge.mkv", 32, 256).read_bytes())
    with pytest.raises(media.MediaError, match="above the limit of 4096 pixels: decoding failed after"):
        media.load_video_url(huge, media.MediaPolicy(max_image_pixels=1024), spec)


def test_containers_outside_the_allowlist_never_reach_ffmpeg(tmp_path, monkeypatch):
    from PIL import Image

    from llavakit.serving import media

    files = {"mpegts": encode_video(tmp_path / "clip.ts", 4, fps=4, codec="mpeg2video")}
    frames = [Image.new("RGB", (32, 32), (index * 60, 0, 0)) for index in range(4)]
    for name, suffix in (("gif", "gif"), ("apng", "png")):  # animated images FFmpeg reads as videos
        files[name] = tmp_path / f"clip.{suffix}"
        frames[0].save(files[name], save_all=True, append_images=frames[1:], duration=250)
    monkeypatch.setattr(av, "open", _no_decoding)
    for name, path in files.items():
        with pytest.raises(media.MediaError, match="not an MP4/MOV, WebM/MKV or AVI file") as caught:
            media.load_video_url(video_url(path.read_bytes()), media.MediaPolicy(), VideoSpec())
        assert caught.value.code == "invalid_video_format", name
    monkeypatch.undo()
    mp4 = encode_video(tmp_path / "clip.mp4", 4, fps=4)
    only_mkv = media.MediaPolicy(allowed_video_formats=("matroska,webm",))
    with pytest.raises(media.MediaError, match="is a 'mov,mp4,m4a,3gp,3g2,mj2' file, not one of"):
        media.load_video_url(video_url(mp4.read_bytes()), only_mkv, VideoSpec())


def test_codecs_outside_the_allowlist_are_refused_before_decoding(tmp_path, monkeypatch):
    from llavakit.serving import media

    monkeypatch.setattr(media, "probe_video", _no_decoding)
    monkeypatch.setattr(media, "load_video", _no_decoding)
    for codec in ("mpeg2video", "ffv1"):
        path = encode_video(tmp_path / f"{codec}.mkv", 4, fps=4, codec=codec)
        with pytest.raises(media.MediaError, match=f"is encoded with '{codec}', not one of") as caught:
            media.load_video_url(video_url(path.read_bytes()), media.MediaPolicy(), VideoSpec())
        assert caught.value.code == "invalid_video_format"
