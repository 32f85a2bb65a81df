"""The on-disk dataset index: hits and misses on every key component, corrupt files rebuilt with a message, atomic
writes, and two gloo ranks that share one scan. The oracle is always the plain in-memory scan of the same data."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import chat, write_image, write_json

import llavakit.data.dataset as dataset_module
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.index import META
from llavakit.errors import DataError, ImageError


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path / "img" / "wide.png", 40, 70)
    write_image(tmp_path / "img" / "tall.png", 90, 30)
    write_json(tmp_path / "d.json", samples())
    return tmp_path


def samples(extra: int = 0) -> list[dict]:
    rows = [
        chat("What is it? <image>", "A red box.", image="wide.png", sample_id="one"),
        chat("Hello there", "Hi.", sample_id="text"),
        chat("<image> and <image>: same?", "No.", image=["wide.png", "tall.png"], sample_id="multi"),
        chat("<image> Describe.", "A tall thing. " * 30, image="tall.png", sample_id="long"),
    ]
    return rows + [chat(f"Question {i}?", f"Answer {i}.", sample_id=f"q{i}") for i in range(extra)]


def config(folder, **overrides) -> DataConfig:
    values = {
        "data_path": str(folder / "d.json"),
        "image_folder": str(folder / "img"),
        "model_max_length": 512,
    }
    return DataConfig(**{**values, **overrides})


@pytest.fixture
def scans(monkeypatch):
    """Number of records scanned (``_scan_record`` calls), over all builds of the test."""
    calls = []
    original = dataset_module._scan_record

    def counting(record, *args):
        calls.append(record.location)
        return original(record, *args)

    monkeypatch.setattr(dataset_module, "_scan_record", counting)
    return calls


def same_dataset(a, b) -> None:
    assert len(a) == len(b) and a.lengths == b.lengths and a.modality_lengths == b.modality_lengths
    assert list(a.entries) == list(b.entries)
    assert a.stats.to_dict() == b.stats.to_dict()
    for index in range(len(a)):
        x, y = a[index], b[index]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_cold_then_warm_start_equals_the_memory_scan(folder, tokenizers, tiny_spec, scans, caplog):
    index_dir = folder / "run" / ".index"
    memory = build_dataset(config(folder), tokenizers["llama"], tiny_spec)
    assert len(scans) == 4
    with caplog.at_level(logging.INFO):
        cold = build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=index_dir)
    assert "no index yet" in caplog.text and len(scans) == 8
    warm = build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=index_dir)
    assert len(scans) == 8, "a warm start must not scan"
    same_dataset(memory, cold)
    same_dataset(memory, warm)
    (stored,) = [p for p in index_dir.iterdir()]
    meta = json.loads((stored / META).read_text())
    assert meta["version"] == 1 and meta["num_samples"] == 4 and meta["stats"]["num_kept"] == 4
    assert not list(stored.glob("*.pkl")) and {p.suffix for p in stored.iterdir()} == {".json", ".npy"}


def test_a_copy_of_the_tokenizer_elsewhere_hits(folder, tokenizers, tiny_spec, scans, tmp_path):
    from transformers import AutoTokenizer

    copies = []
    for name in ("a", "b"):
        tokenizers["llama"].save_pretrained(tmp_path / name)
        copies.append(AutoTokenizer.from_pretrained(tmp_path / name))
    for tokenizer in copies:
        build_dataset(config(folder), tokenizer, tiny_spec, index_dir=folder / "idx")
    assert len(scans) == 4


def _touch_data(folder, cfg):
    path = Path(cfg.data_path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    return cfg


def _rewrite_data(folder, cfg):
    write_json(Path(cfg.data_path), samples(extra=1))
    return cfg


CHANGES = {
    "data_mtime": (_touch_data, "data_files"),
    "data_content": (_rewrite_data, "data_files"),
    "template": (lambda folder, cfg: replace(cfg, template="mistral_instruct"), "template"),
    "system_prompt": (lambda folder, cfg: replace(cfg, system_prompt="Be brief."), "template"),
    "upstream_quirks": (
        lambda folder, cfg: replace(cfg, template="qwen_2", upstream_quirks=False),
        "template",
    ),
    "max_length": (lambda folder, cfg: replace(cfg, model_max_length=200), "max_length"),
    "truncation_policy": (
        lambda folder, cfg: replace(cfg, truncation_policy="downscale"),
        "truncation_policy",
    ),
    "skip_policy": (lambda folder, cfg: replace(cfg, skip_policy="skip"), "skip_policy"),
    "image_folder": (lambda folder, cfg: replace(cfg, image_folder=str(folder / "img" / ".")), None),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_key_component_misses_with_a_message(change, folder, tokenizers, tiny_spec, scans, caplog):
    first = config(folder, template="qwen_2") if change == "upstream_quirks" else config(folder)
    tokenizer = tokenizers["qwen2" if change == "upstream_quirks" else "llama"]
    build_dataset(first, tokenizer, tiny_spec, index_dir=folder / "idx")
    build_dataset(first, tokenizer, tiny_spec, index_dir=folder / "idx")
    assert len(scans) == 4
    edit, component = CHANGES[change]
    second = edit(folder, first)
    with caplog.at_level(logging.WARNING):
        rebuilt = build_dataset(second, tokenizer, tiny_spec, index_dir=folder / "idx")
    if component is None:  # the same folder written differently resolves to the same key
        assert len(scans) == 4
        return
    assert len(scans) > 4, f"changing {change} must rebuild the index"
    assert f"{component} changed" in caplog.text
    same_dataset(rebuilt, build_dataset(second, tokenizer, tiny_spec))


def test_tokenizer_and_image_spec_are_in_the_key(folder, tokenizers, tiny_spec, scans, caplog, tmp_path):
    from transformers import AutoTokenizer

    build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    with caplog.at_level(logging.WARNING):
        build_dataset(config(folder), tokenizers["gemma"], tiny_spec, index_dir=folder / "idx")
        assert "(tokenizer changed)" in caplog.text and len(scans) == 8
        tokenizers["llama"].save_pretrained(tmp_path / "tok")
        extended = AutoTokenizer.from_pretrained(tmp_path / "tok")
        extended.add_tokens(["<an_added_token>"])
        caplog.clear()
        build_dataset(config(folder), extended, tiny_spec, index_dir=folder / "idx")
        assert "(tokenizer changed)" in caplog.text and len(scans) == 12
        caplog.clear()
        spec = replace(tiny_spec, image_mean=(0.5, 0.5, 0.5))
        build_dataset(config(folder), tokenizers["llama"], spec, index_dir=folder / "idx")
        assert "(image_spec changed)" in caplog.text and len(scans) == 16


def test_mixture_members_and_seed_are_in_the_key(folder, tokenizers, tiny_spec, scans, caplog):
    mixture = folder / "mix.yaml"
    write_json(folder / "more.json", samples(extra=6)[4:])
    mixture.write_text(
        "datasets:\n  - json_path: d.json\n  - json_path: more.json\n    sampling_strategy: random:3\n"
    )
    cfg = config(folder, data_path=str(mixture))
    build_dataset(cfg, tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    build_dataset(cfg, tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert len(scans) == 7
    _touch_data(folder, replace(cfg, data_path=str(folder / "more.json")))
    with caplog.at_level(logging.WARNING):
        build_dataset(cfg, tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert "data_files changed" in caplog.text and len(scans) == 14
    build_dataset(replace(cfg, seed=1), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert "mixture_seed changed" in caplog.text and len(scans) == 21


def _truncate_samples(stored: Path) -> None:
    path = stored / "samples.npy"
    path.write_bytes(path.read_bytes()[:-7])


def _bad_meta(stored: Path) -> None:
    (stored / META).write_text('{"version": 1, "key": ')


def _wrong_shape(stored: Path) -> None:
    # A well-formed array of the wrong length, with meta.json updated to match it: only the shape check sees it.
    path = stored / "lengths.npy"
    np.save(path, np.arange(3, dtype=np.int64))
    meta = json.loads((stored / META).read_text())
    from llavakit.data.index import _sha256

    meta["files"]["lengths.npy"] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (stored / META).write_text(json.dumps(meta))


def _missing_file(stored: Path) -> None:
    (stored / "image_sizes.npy").unlink()


def _flipped_byte(stored: Path) -> None:
    path = stored / "image_tiled.npy"
    content = bytearray(path.read_bytes())
    content[-1] ^= 1
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage", [_truncate_samples, _bad_meta, _wrong_shape, _missing_file, _flipped_byte])
def test_a_corrupt_index_is_reported_and_rebuilt(damage, folder, tokenizers, tiny_spec, scans, caplog):
    build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    (stored,) = list((folder / "idx").iterdir())
    damage(stored)
    with caplog.at_level(logging.WARNING):
        rebuilt = build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert "rebuilding" in caplog.text and str(stored) in caplog.text
    assert len(scans) == 8
    same_dataset(rebuilt, build_dataset(config(folder), tokenizers["llama"], tiny_spec))


def test_a_crash_while_writing_leaves_no_partial_index(folder, tokenizers, tiny_spec, monkeypatch, scans):
    import llavakit.data.index as index_module

    saved = []
    real_save = np.save

    def crashing_save(path, array, allow_pickle):
        saved.append(path)
        if len(saved) == 3:
            raise OSError("disk full (simulated)")
        real_save(path, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(index_module.np, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert list((folder / "idx").iterdir()) == [], "no partial index (nor temporary folder) may be left"
    monkeypatch.setattr(index_module.np, "save", real_save)
    build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    build_dataset(config(folder), tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert len(scans) == 8


def test_skip_fraction_is_checked_on_a_warm_start_too(folder, tokenizers, tiny_spec):
    write_json(folder / "d.json", [*samples(), chat("<image> Hi", "Yo.", image="gone.png", sample_id="bad")])
    cfg = config(folder, skip_policy="skip", max_skip_fraction=0.5)
    first = build_dataset(cfg, tokenizers["llama"], tiny_spec, index_dir=folder / "idx")
    assert first.stats.issues.counts["image"] == 1 and len(first) == 4
    with pytest.raises(DataError, match="max_skip_fraction"):
        build_dataset(
            replace(cfg, max_skip_fraction=0.1), tokenizers["llama"], tiny_spec, index_dir=folder / "idx"
        )


# ------------------------------------------------------------------------------------------- two gloo ranks


def _rank_main(rank: int, world: int, port: int, folder: str, tokenizer_dir: str, result_dir: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from llavakit.anyres.spec import ImageSpec
    from llavakit.distributed import DistContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    context = DistContext(rank, world, rank, torch.device("cpu"))
    scanned = []
    original = dataset_module._scan_record
    dataset_module._scan_record = lambda record, *args: (
        scanned.append(record.location) or original(record, *args)
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = ImageSpec(tile_size=32, patch_size=8, pinpoints=((32, 64), (64, 32), (64, 64)))
    cfg = config(Path(folder), skip_policy="skip", max_skip_fraction=0.5)
    out: dict = {}
    for phase in ("cold", "warm"):
        data = build_dataset(cfg, tokenizer, spec, index_dir=Path(folder) / "idx", context=context)
        out[phase] = {
            "scanned": list(scanned),
            "lengths": data.lengths,
            "ids": [data.entries[i].sample.id for i in range(len(data))],
            "tiled": [list(data.entries[i].image_tiled) for i in range(len(data))],
            "stats": data.stats.to_dict(),
        }
    failing = replace(cfg, data_path=str(Path(folder) / "bad.json"), skip_policy="error")
    try:
        build_dataset(failing, tokenizer, spec, index_dir=Path(folder) / "idx", context=context)
        out["error"] = None
    except (DataError, ImageError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_share_one_scan_and_get_the_memory_index(folder, tokenizers, tiny_spec, tmp_path):
    rows = [*samples(extra=5), chat("<image> Hi", "Yo.", image="gone.png", sample_id="bad")]
    write_json(folder / "d.json", rows)
    # Record 1 (rank 1's share) is bad: under skip_policy=error rank 1 raises and rank 0 must not hang.
    write_json(folder / "bad.json", [rows[0], rows[-1], rows[1]])
    tokenizers["llama"].save_pretrained(tmp_path / "tok")
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(
        _rank_main, args=(2, _free_port(), str(folder), str(tmp_path / "tok"), str(results)), nprocs=2
    )
    ranks = [json.loads((results / f"{rank}.json").read_text()) for rank in range(2)]
    memory = build_dataset(
        config(folder, skip_policy="skip", max_skip_fraction=0.5), tokenizers["llama"], tiny_spec
    )
    expected = {
        "lengths": memory.lengths,
        "ids": [entry.sample.id for entry in memory.entries],
        "tiled": [list(entry.image_tiled) for entry in memory.entries],
        "stats": memory.stats.to_dict(),
    }
    scanned = [rank["cold"]["scanned"] for rank in ranks]
    assert sorted(scanned[0] + scanned[1]) == sorted(
        f"{folder / 'd.json'}:{i}" for i in _lines(folder / "d.json")
    )
    assert not set(scanned[0]) & set(scanned[1]), "each record is scanned by exactly one rank"
    for rank in ranks:
        assert rank["warm"]["scanned"] == rank["cold"]["scanned"], "a warm start must not scan"
        for phase in ("cold", "warm"):
            assert {key: rank[phase][key] for key in expected} == expected
    assert ranks[1]["error"].startswith("ImageError") and "gone.png" in ranks[1]["error"]
    assert ranks[0]["error"].startswith("DataError") and "rank 1 failed" in ranks[0]["error"]


def _lines(path: Path) -> list[int]:
    """Line numbers where the records of an indented JSON list start (the readers' ``file:line``)."""
    from llavakit.data.formats import read_records
    from llavakit.data.issues import IssueLog

    return [int(record.location.rsplit(":", 1)[1]) for record in read_records(path, IssueLog())]
