"""Custom benchmarks in LLaVA's layout: question .jsonl + image folder → answers .jsonl as upstream's
``model_vqa_loader.py`` writes it, through the resumable runner."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import png_bytes

from llavakit.errors import DataError
from llavakit.evaluation.custom import answer_id, answer_questions, model_id, work_dir
from llavakit.evaluation.runner import EvalOptions
from llavakit.inference.api import load

# upstream model_vqa_loader.py writes these keys, in this order
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return load(checkpoint, device="cpu")


def _questions(tmp_path, questions):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for number, size in enumerate(((24, 16), (40, 32), (32, 32))):
        (images / f"{number}.png").write_bytes(png_bytes(size, (number * 70, 90, 10)))
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(question) + "\n" for question in questions))
    return path, images


QUESTIONS = [
    {"question_id": 7, "image": "0.png", "text": "What is shown?\nAnswer briefly.", "category": "a"},
    {"question_id": "x-1", "image": "1.png", "text": "Which colour?"},
    {"question_id": 9, "text": "Say a word."},
    {"question_id": 10, "image": "2.png", "text": "Is it square?", "category": "b"},
]


def _answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_file_has_upstreams_fields_and_each_answer_equals_a_single_request(assistant, tmp_path):
    questions, images = _questions(tmp_path, QUESTIONS)
    out = tmp_path / "answers" / "llava-v1.5-7b.jsonl"
    options = EvalOptions(batch_size=3, max_new_tokens=4, progress=False)
    result = answer_questions("ckpts/my-model", questions, images, out, options, assistant=assistant)
    answers = _answers(out)
    assert [list(answer) for answer in answers] == [ANSWER_KEYS] * 4
    assert [a["question_id"] for a in answers] == [7, "x-1", 9, 10]  # JSON types kept
    assert [a["prompt"] for a in answers] == [q["text"] for q in QUESTIONS]
    assert {a["model_id"] for a in answers} == {"my-model"} and all(a["metadata"] == {} for a in answers)
    assert len({a["answer_id"] for a in answers}) == 4
    for question, answer in zip(QUESTIONS, answers):
        has_image = "image" in question
        prompt = f"<image>\n{question['text']}" if has_image else question["text"]
        image = [images / question["image"]] if has_image else []
        alone = assistant.generate([prompt], images=[image], max_new_tokens=4, do_sample=False)
        assert answer["text"] == alone[0]
    assert result.generated == 4 and result.metrics == {
        "answers": 4.0,
        "empty": float(sum(not a["text"] for a in answers)),
    }


def test_a_rerun_answers_nothing_again_and_limit_takes_the_first_questions(assistant, tmp_path):
    questions, images = _questions(tmp_path, QUESTIONS)
    out = tmp_path / "answers.jsonl"
    options = EvalOptions(batch_size=2, max_new_tokens=3, progress=False)
    first = answer_questions("m", questions, images, out, options, limit=2, assistant=assistant)
    assert first.generated == 2 and [a["question_id"] for a in _answers(out)] == [7, "x-1"]
    texts = [a["text"] for a in _answers(out)]
    again = answer_questions("m", questions, images, out, options, assistant=assistant)
    assert again.generated == 2 and [a["text"] for a in _answers(out)][:2] == texts
    assert (work_dir(out) / "predictions.jsonl").is_file()


def test_an_unusable_image_is_an_empty_answer_with_its_error(assistant, tmp_path):
    questions, images = _questions(
        tmp_path, [*QUESTIONS[:1], {"question_id": 3, "image": "nope.png", "text": "?"}]
    )
    out = tmp_path / "answers.jsonl"
    result = answer_questions(
        "m", questions, images, out, EvalOptions(max_new_tokens=2, progress=False), assistant=assistant
    )
    broken = _answers(out)[1]
    assert broken["text"] == "" and "nope.png" in broken["metadata"]["error"] and list(result.failed) == ["3"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question_id": 1, "image": "0.png"}', r"questions.jsonl:2: a question needs"),
        ('{"question_id": [1], "text": "?"}', r"questions.jsonl:2: a question needs"),
        ('{"question_id": 1, "text": "?", "image": 5}', "'image' must be a file name"),
        ("{oops", r"questions.jsonl:2: malformed JSON"),
    ],
)
def test_malformed_questions_name_their_line(tmp_path, line, message):
    questions, images = _questions(tmp_path, QUESTIONS[:1])
    questions.write_text(questions.read_text() + line + "\n")
    with pytest.raises(DataError, match=message):
        answer_questions("m", questions, images, tmp_path / "a.jsonl", assistant=object())


def test_missing_inputs_are_refused_before_loading(tmp_path):
    questions, images = _questions(tmp_path, [QUESTIONS[0], QUESTIONS[0]])
    with pytest.raises(DataError, match="image folder .*nowhere does not exist"):
        answer_questions("m", questions, tmp_path / "nowhere", tmp_path / "a.jsonl")
    with pytest.raises(DataError, match="question file .*none.jsonl does not exist"):
        answer_questions("m", tmp_path / "none.jsonl", images, tmp_path / "a.jsonl")


def test_repeated_question_ids_are_named(assistant, tmp_path):
    questions, images = _questions(tmp_path, [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]])
    with pytest.raises(DataError, match="repeats '7'"):
        answer_questions("m", questions, images, tmp_path / "a.jsonl", assistant=assistant)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("runs/sft/", "sft"),
        ("runs/sft/checkpoint-500", "sft_checkpoint-500"),
        ("checkpoint-500", "checkpoint-500"),
    ],
)
def test_model_id_is_named_as_upstream_names_it(path, expected):
    assert model_id(path) == expected


def test_answer_ids_are_22_characters_of_shortuuids_alphabet():
    ids = {answer_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(
        len(i) == 22 and set(i) <= set("23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
        for i in ids
    )


def test_cli_custom_writes_the_answers_file(checkpoint, tmp_path, capsys):
    from llavakit.cli.main import main

    questions, images = _questions(tmp_path, QUESTIONS)
    out = tmp_path / "answers.jsonl"
    command = ["eval", "custom", "--model", str(checkpoint), "--questions", str(questions), "--image-folder"]
    assert main([*command, str(images), "--answers-file", str(out), "--max-new-tokens", "3", "--no-progress"]) == 0
    assert [a["question_id"] for a in _answers(out)] == [7, "x-1", 9, 10]
    assert f"4 answers (0 failed) in {out}" in capsys.readouterr().out
