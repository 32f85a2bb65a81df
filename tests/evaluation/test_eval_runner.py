"""The evaluation runner on a tiny random checkpoint: answers, resuming, failures, the CLI, torchrun sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_fixtures import png_bytes, write_parquet

from llavakit.cli.main import main
from llavakit.errors import DataError
from llavakit.evaluation import score
from llavakit.evaluation.registry import get_benchmark
from llavakit.evaluation.runner import EvalOptions, evaluate
from llavakit.evaluation.sources import load_benchmark_data
from llavakit.inference.api import load

SIZES = ((24, 16), (16, 40), (32, 32), (48, 20))


def _mme_rows(images: int) -> list[dict]:
    """MME-schema rows: ``images`` images of varied sizes, two questions each."""
    rows = []
    for number in range(images):
        for answer in ("Yes", "No"):
            rows.append(
                {
                    "question_id": f"existence/{number:04d}.png",
                    "question": f"Is there a {'red ' * (number % 3)}shape number {number}? Please answer yes or no.",
                    "answer": answer,
                    "category": "existence" if number % 2 else "OCR",
                    "image": png_bytes(SIZES[number % len(SIZES)], (number * 40 % 255, 90, 10)),
                }
            )
    return rows


def _predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return load(checkpoint, device="cpu")


def test_answers_equal_single_requests_and_scores_match(assistant, tmp_path):
    source = write_parquet(tmp_path / "mme.parquet", _mme_rows(5))
    data = load_benchmark_data(get_benchmark("mme"), source)
    result = evaluate(assistant, data, tmp_path / "out", EvalOptions(batch_size=4, progress=False))
    records = _predictions(tmp_path / "out" / "predictions.jsonl")
    assert [r["question_id"] for r in records] == [str(i) for i in range(10)] and result.generated == 10
    for record, row in zip(records[:4], _mme_rows(5)):
        alone = assistant.generate(
            [f"<image>\n{record['prompt']}"], images=[[row["image"]]], max_new_tokens=16, do_sample=False
        )
        assert record["prediction"] == alone[0]
        assert record["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    rows = [{**row, "prediction": r["prediction"]} for row, r in zip(_mme_rows(5), records)]
    assert result.metrics == score("mme", rows)
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["metrics"] == result.metrics and summary["questions"] == 10 and summary["failed"] == 0


def test_resume_generates_only_what_is_missing(assistant, tmp_path):
    source = write_parquet(tmp_path / "mme.parquet", _mme_rows(4))
    data = load_benchmark_data(get_benchmark("mme"), source)
    options = EvalOptions(batch_size=3, progress=False)
    evaluate(assistant, data, tmp_path / "full", options)
    full = (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()
    partial = tmp_path / "partial"
    partial.mkdir()
    # three finished answers and a line cut by the kill
    (partial / "predictions.jsonl").write_text("\n".join(full[2:5]) + "\n" + full[5][:20])
    result = evaluate(assistant, data, partial, options)
    assert result.generated == 5
    assert [json.loads(line) for line in (partial / "predictions.jsonl").read_text().splitlines()] == [
        json.loads(line) for line in full
    ]


def test_an_unusable_image_fails_its_question_only(assistant, tmp_path):
    rows = _mme_rows(3)
    rows[2]["image"] = b"not an image at all"
    rows[3]["image"] = png_bytes((1, 40))
    data = load_benchmark_data(get_benchmark("mme"), write_parquet(tmp_path / "mme.parquet", rows))
    result = evaluate(assistant, data, tmp_path / "out", EvalOptions(batch_size=8, progress=False))
    assert sorted(result.failed) == ["2", "3"] and "not a readable image" in result.failed["2"]
    records = _predictions(tmp_path / "out" / "predictions.jsonl")
    assert [r["prediction"] is None for r in records] == [False, False, True, True, False, False]
    assert "mme_perception_score" in result.metrics


def test_cli_runs_scores_and_rescores(checkpoint, tmp_path, capsys):
    source = write_parquet(tmp_path / "mme.parquet", _mme_rows(2))
    out = tmp_path / "out"
    args = ["eval", "--model", str(checkpoint), "--benchmark", "mme", "--data", str(source), "--no-progress"]
    assert main([*args, "--out", str(out), "--batch-size", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["benchmarks"]["mme"]["metrics"]
    assert "mme_perception_score" in capsys.readouterr().out
    predictions = out / "mme" / "predictions.jsonl"
    assert (
        main(["eval", "score", "mme", "--data", str(source), "--predictions", str(predictions), "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == metrics


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question_id": 0, "prediction": "Yes"}'], "3 question(s) without a prediction"),
        ([*(f'{{"question_id": {i}, "prediction": "No"}}' for i in range(4)), '{"question_id": 9, "prediction": ""}'],
         "1 id(s) not in the data (9)"),
        (['{"question_id": 0, "prediction": "Yes"}', '{"question_id": "0", "prediction": "No"}'], "duplicate"),
        (['{"question_id": 0, "prediction": 3}'], "must be a string or null"),
        (["{oops"], "malformed JSON"),
    ],
)  # fmt: skip
def test_score_refuses_bad_predictions(tmp_path, capsys, lines, message):
    source = write_parquet(tmp_path / "mme.parquet", _mme_rows(2))
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("\n".join(lines) + "\n")
    assert main(["eval", "score", "mme", "--data", str(source), "--predictions", str(predictions)]) == 2
    assert message in capsys.readouterr().err


def test_cli_names_unknown_benchmarks_and_bad_data_flags(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--benchmark", "mme,nope"]) == 2
    error = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in error and "valid benchmark ids: " in error
    assert main(["eval", "--model", str(tmp_path), "--benchmark", "mme,pope", "--data", "x.parquet"]) == 2
    assert "write ID=SRC" in capsys.readouterr().err


def _cli(checkpoint, source, out, *extra):
    return [
        sys.executable, "-m", "llavakit.cli.main", "eval", "--model", str(checkpoint), "--benchmark", "mme",
        "--data", str(source), "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_a_killed_run_resumes_without_redoing_answers(checkpoint, tmp_path):
    source = write_parquet(tmp_path / "mme.parquet", _mme_rows(40))
    out = tmp_path / "out"
    predictions = out / "mme" / "predictions.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_cli(checkpoint, source, out, "--batch-size", "1"), env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not predictions.is_file() or len(predictions.read_text().splitlines()) < 5
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = predictions.read_text().splitlines()
    finished = [line for line in before if line.endswith("}")]
    assert 5 <= len(finished) < 80
    done = subprocess.run(
        _cli(checkpoint, source, out, "--batch-size", "1"), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())["benchmarks"]["mme"]
    records = {r["question_id"]: r for r in _predictions(predictions)}
    assert summary["questions"] == 80 and summary["generated"] == 80 - len(
        {json.loads(x)["question_id"] for x in finished}
    )
    for line in finished:
        kept = json.loads(line)
        assert records[kept["question_id"]]["prediction"] == kept["prediction"]


@pytest.mark.slow
def test_two_torchrun_processes_equal_one(checkpoint, tmp_path):
    source = write_parquet(tmp_path / "mme.parquet", _mme_rows(9))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single = subprocess.run(_cli(checkpoint, source, tmp_path / "one", "--batch-size", "3"), env=env)
    assert single.returncode == 0
    command = _cli(checkpoint, source, tmp_path / "two", "--batch-size", "3")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *command[1:],
    ]
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    one = _predictions(tmp_path / "one" / "mme" / "predictions.jsonl")
    two = _predictions(tmp_path / "two" / "mme" / "predictions.jsonl")
    assert one == two and len(two) == 18
    assert not list((tmp_path / "two" / "mme").glob("predictions.rank*"))
    metrics = [
        json.loads((tmp_path / d / "metrics.json").read_text())["benchmarks"]["mme"]["metrics"]
        for d in ("one", "two")
    ]
    assert metrics[0] == metrics[1]


def test_answers_of_another_run_are_not_resumed(assistant, tmp_path):
    source = write_parquet(tmp_path / "a.parquet", _mme_rows(2))
    out = tmp_path / "out"
    evaluate(assistant, load_benchmark_data(get_benchmark("mme"), source), out, EvalOptions(progress=False))
    other = [{**row, "question": "Something else entirely?"} for row in _mme_rows(2)]
    renamed = write_parquet(tmp_path / "b" / "a.parquet", other)
    with pytest.raises(DataError, match="different data"):
        evaluate(
            assistant, load_benchmark_data(get_benchmark("mme"), renamed), out, EvalOptions(progress=False)
        )
    (out / "run.json").unlink()
    with pytest.raises(DataError, match="belong to other data"):
        evaluate(
            assistant, load_benchmark_data(get_benchmark("mme"), renamed), out, EvalOptions(progress=False)
        )
    with pytest.raises(DataError, match=r"different .*max_new_tokens"):
        evaluate(
            assistant,
            load_benchmark_data(get_benchmark("mme"), source),
            out,
            EvalOptions(max_new_tokens=3, progress=False),
        )


def test_an_image_failing_to_decode_alone_in_its_batch_fails_only_its_question(
    assistant, tmp_path, monkeypatch
):
    from llavakit.errors import ImageError

    data = load_benchmark_data(get_benchmark("mme"), write_parquet(tmp_path / "mme.parquet", _mme_rows(2)))
    real = assistant.generate_requests

    def decode_fails_for_row_one(requests, **sampling):
        if any(request.conversation.turns[0].text.count("number 1?") for request in requests):
            raise ImageError("image bytes: the image data is corrupt or truncated")
        return real(requests, **sampling)

    monkeypatch.setattr(assistant, "generate_requests", decode_fails_for_row_one)
    result = evaluate(assistant, data, tmp_path / "out", EvalOptions(batch_size=1, progress=False))
    assert sorted(result.failed) == ["2", "3"] and result.questions == 4


def test_snapshot_files_are_chosen_inside_the_snapshot(tmp_path):
    from llavakit.errors import DataError as Error

    snapshot = tmp_path / "test" / "POPE"  # a parent folder named like the split
    write_parquet(snapshot / "data" / "test-00000-of-00001.parquet", _mme_rows(1))
    write_parquet(snapshot / "Full" / "adversarial-00000-of-00001.parquet", _mme_rows(2))
    assert len(load_benchmark_data(get_benchmark("mme"), snapshot)) == 2
    mmbench = tmp_path / "MMBench"
    write_parquet(mmbench / "cn" / "dev-00000-of-00001.parquet", _mme_rows(1))
    with pytest.raises(Error, match=r"no 'en' folder .* found folders \['cn'\]"):
        load_benchmark_data(get_benchmark("mmbench_en_dev"), mmbench)
