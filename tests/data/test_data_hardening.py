"""Hardened data reading: JSON files that do not end where their syntax says, non-UTF-8 files, images whose header
breaks the loader's limits (decompression bombs, 1×1, 81 MP) and truncated images found by ``data inspect --decode``
even when a library set PIL's ``LOAD_TRUNCATED_IMAGES``."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
from data_helpers import chat, write_image, write_json
from PIL import Image, ImageFile

from llavakit.anyres.pixels import load_image
from llavakit.cli.main import main
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.formats import read_records
from llavakit.data.images import read_image_size
from llavakit.data.issues import IssueLog
from llavakit.errors import DataError, ImageError
from llavakit.model.tokenizer import build_bpe_tokenizer


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width``×``height`` (1-bit grey); its pixel data is a few zero rows only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def noise_image(path, fmt: str = "PNG"):
    """A 96×128 random-noise image (incompressible, so cutting the file removes pixel data)."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def tokenizer_dir(tmp_path):
    path = tmp_path / "tok"
    build_bpe_tokenizer("llama").save_pretrained(path)
    return path


@pytest.fixture
def spec_path(tmp_path, tiny_spec):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"llavakit": {"image_spec": tiny_spec.to_dict()}}))
    return path


def inspect(data, folder, tokenizer_dir, spec_path, *extra):
    args = ["data", "inspect", str(data), "--image-folder", str(folder), "--tokenizer", str(tokenizer_dir)]
    return main([*args, "--image-spec", str(spec_path), *extra])


def training_dataset(data, folder, tokenizer, spec, skip_policy="error"):
    config = DataConfig(data_path=str(data), image_folder=str(folder), skip_policy=skip_policy)
    return build_dataset(config, tokenizer, spec)


# --- JSON files that end early or late ----------------------------------------------------------------------------


def two_samples_text() -> str:
    return json.dumps([chat("Hi", "Yo.", sample_id="a"), chat("Bye", "Ciao.", sample_id="b")], indent=1)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_json_list_without_closing_bracket_is_an_error_not_a_shorter_dataset(tmp_path, policy):
    text = two_samples_text()
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex("]")])  # cut after the last complete sample
    last_line = text[: text.rindex("]")].count("\n") + 1
    with pytest.raises(
        DataError, match=rf"cut\.json:{last_line}: the JSON list has no closing '\]'.*re-download"
    ):
        list(read_records(path, IssueLog(policy, max_fraction=1.0)))


def test_json_list_cut_inside_a_sample_is_an_error_under_skip(tmp_path):
    text = two_samples_text()
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"b"')])
    with pytest.raises(DataError, match=r"cut\.json:\d+: malformed JSON"):
        list(read_records(path, IssueLog("skip", max_fraction=1.0)))


@pytest.mark.parametrize("garbage", ["]", "garbage", '{"id": "c"}'])
def test_text_after_the_json_list_is_an_error(tmp_path, garbage):
    path = tmp_path / "long.json"
    path.write_text(two_samples_text() + "\n\n" + garbage + "\n")
    line = two_samples_text().count("\n") + 3
    with pytest.raises(DataError, match=rf"long\.json:{line}: unexpected text after the closing '\]'"):
        list(read_records(path, IssueLog("skip", max_fraction=1.0)))


def test_truncated_json_stops_training_and_inspect(
    tmp_path, tokenizers, tiny_spec, tokenizer_dir, spec_path, capsys
):
    text = two_samples_text()
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex("]")])
    with pytest.raises(DataError, match=r"cut\.json:\d+: the JSON list has no closing"):
        training_dataset(path, tmp_path, tokenizers["llama"], tiny_spec, skip_policy="skip")
    assert inspect(path, tmp_path, tokenizer_dir, spec_path, "--max-error-fraction", "1") == 2
    assert re.search(r"cut\.json:\d+: the JSON list has no closing", capsys.readouterr().err)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_latin1_file_names_file_and_line(tmp_path, suffix, tokenizers, tiny_spec):
    samples = [chat("Hi", "Yo.", sample_id="a"), chat("Un café ?", "Oui.", sample_id="b")]
    path = tmp_path / f"latin{suffix}"
    if suffix == ".jsonl":
        text = "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    else:
        text = json.dumps(samples, ensure_ascii=False, indent=1)
    path.write_bytes(text.encode("latin-1"))
    line = next(n for n, text in enumerate(path.read_bytes().split(b"\n"), 1) if b"caf" in text)
    expected = rf"latin{re.escape(suffix)}:{line}: not UTF-8 \(byte 0xe9.*re-save the file as UTF-8"
    with pytest.raises(DataError, match=expected):
        list(read_records(path, IssueLog("skip", max_fraction=1.0)))
    with pytest.raises(DataError, match=expected):
        training_dataset(path, tmp_path, tokenizers["llama"], tiny_spec, skip_policy="skip")


# --- image headers: the loader's limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (20000, 20000, "400000000 pixels"),  # PIL's Image.open raises DecompressionBombError
        (9000, 9000, "81000000 pixels"),  # 81 MP: below PIL's bomb limit, above load_image's
        (1, 1, "a side is below 2 px"),
    ],
)
def test_header_check_applies_the_loader_limits(
    tmp_path, width, height, message, tokenizers, tiny_spec, tokenizer_dir, spec_path, capsys
):
    image = tmp_path / "img" / "big.png"
    image.parent.mkdir()
    image.write_bytes(png_header_only(width, height))
    with pytest.raises(ImageError, match=message):  # the loader itself refuses it
        load_image(image)
    with pytest.raises(ImageError, match=rf"big\.png.*{message}"):
        read_image_size(image)
    data = write_json(tmp_path / "d.json", [chat("<image>", "x", image="big.png", sample_id="big")])
    with pytest.raises(ImageError, match=rf"d\.json:2 \(sample 'big'\).*big\.png.*{message}"):
        training_dataset(data, tmp_path / "img", tokenizers["llama"], tiny_spec)
    assert inspect(data, tmp_path / "img", tokenizer_dir, spec_path) == 1
    out = capsys.readouterr().out
    assert "'big'" in out and message in out and "usable: 0" in out


# --- full decode ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["strict-pil", "load-truncated-images"])
def truncated_flag(request, monkeypatch):
    """Both settings of PIL's process-wide flag that lmms-eval sets to True."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", request.param)
    return request.param


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_refuses_truncated_files_whatever_the_flag(tmp_path, fmt, truncated_flag):
    whole = noise_image(tmp_path / f"whole.{fmt.lower()}", fmt)
    assert load_image(whole).size == (128, 96)
    assert load_image(whole.read_bytes()).size == (128, 96)
    cut = cut_in_half(noise_image(tmp_path / f"cut.{fmt.lower()}", fmt))
    with pytest.raises(ImageError, match=r"cut\.\w+.*corrupt or truncated"):
        load_image(cut)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut.read_bytes())


def test_decode_finds_what_the_header_check_passes(
    tmp_path, tokenizer_dir, spec_path, capsys, truncated_flag
):
    folder = tmp_path / "img"
    write_image(folder / "good.png", 40, 70)
    cut_in_half(noise_image(folder / "cut.png"))
    samples = [
        chat("<image>", "x", image="good.png", sample_id="good"),
        chat("<image>", "y", image="cut.png", sample_id="cut"),
        chat("Hello", "Hi.", sample_id="text"),
    ]
    data = write_json(tmp_path / "d.json", samples)

    assert inspect(data, folder, tokenizer_dir, spec_path) == 0
    out = capsys.readouterr().out
    assert "usable: 3" in out and "only headers were checked" in out and "PASS" in out

    assert inspect(data, folder, tokenizer_dir, spec_path, "--decode", "--workers", "2") == 1
    out = capsys.readouterr().out
    assert "usable: 2" in out and "bad: 1" in out and "FAIL" in out
    assert re.search(r"d\.json:\d+ \(sample 'cut'\).*cut\.png.*corrupt or truncated", out)
    match = re.search(
        r"images: 2 fully decoded in [\d.]+ s \(([\d.]+) images/s, 2 threads\), 1 unreadable", out
    )
    assert match and float(match.group(1)) > 0
    assert "only headers were checked" not in out


def test_latin1_mixture_yaml_is_a_clear_error(tmp_path):
    from llavakit.data.mixture import load_mixture
    from llavakit.errors import ConfigError

    path = tmp_path / "mix.yaml"
    path.write_bytes("datasets:\n  - json_path: caf\xe9.json\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8.*iconv"):
        load_mixture(path)
