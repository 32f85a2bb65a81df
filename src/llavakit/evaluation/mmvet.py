"""MM-Vet: 218 open-ended questions needing several capabilities at once, graded 0-1 by an LLM judge against a
reference answer, scored as lmms-eval 0.7.3's ``mmvet`` task scores them.

Data: lmms-eval's Hub dataset (``lmms-lab-encoder/MMVet``, ``test`` split; columns ``question_id`` -- "v1_0",
..., unique: predictions files key rows by it --, ``image``, ``question``, ``answer`` -- the reference, where
``<AND>`` joins parts that must all appear and ``<OR>`` alternatives --, ``image_source``, ``capability`` -- the
capabilities the question needs, comma-joined: "rec,ocr,know").

Prompt (``doc_to_text`` with the YAML's default kwargs): "First please perform reasoning, and think step by step
to provide best answer to the following question: \\n\\n" then the question. Generation: up to 1024 new tokens
(the YAML's temperature 0.2 is moot: ``do_sample`` is false), stopping at lmms-eval's default "\\n\\n".

Scoring (``mmvet_process_results``): the grader prompt -- MM-Vet's few-shot table, whose header reads
"gpt_query_prompt | Ground truth | Prediction | Correctness" in lmms-eval (a renamed "Question" column, kept), and
which ends with a newline, so a blank line precedes the row -- then "{question} | {answer} | {prediction} |", the
answer with spaces put around ``<AND>`` and ``<OR>``, the prediction stripped (lmms-eval strips every generated
answer before a task's ``process_results``). One user message, ``max_tokens`` 128. The grade is
``float()`` of the reply's text before its first space ("0.8", not "0.8." nor "0.8\\nBecause"), kept when
0.0 <= grade <= 1.0. The retries, as lmms-eval nests them:

- a request is 5 tries 10 s apart (lmms-eval's provider defaults); a reply with no content is a failed try;
- ``get_chat_response`` asks up to 3 times until the stripped reply is non-empty (5 s more after an error whose
  text says "Rate limit"); three failures or empty replies grade the row 0.0 (counted: ``judge/failed``);
- an unreadable grade asks again with the temperature raised by 0.5, from 0.0 up to 1.5; a fourth unreadable
  grade scores 0.0 (counted: ``judge/unparsed``).

Aggregation (``mmvet_aggregate_results``): ``gpt_eval_score`` = mean grade x 100. lmms-eval also computes, and
only logs, per-capability means x 100 -- a row counts for capability ``rec`` when "rec" is a substring of its
``capability`` -- and per-combination means (the row's capability set equal to one of MM-Vet's 16 combinations,
e.g. ``rec_gen_know``); we report them as ``capability/<cap>`` and ``capability_detail/<combination>``, leaving
out the ones without rows (lmms-eval logs 0.00 for those). ``judge/failed`` and ``judge/unparsed`` count the
0.0 grades that came from the judge, not the model.

Differences from lmms-eval: (1) a grade that parses but lies outside 0-1 ("5", "nan") makes lmms-eval ask again
at the *same* temperature forever; we treat it as unreadable (temperature raised, at most four rounds).
(2) After an unreadable grade lmms-eval sends one extra request at the raised temperature and discards its reply
before asking again; we do not send it (the scores cannot differ, the bill does). (3) No API key: lmms-eval
fails when it loads the task (its module builds the ``openai`` client on import); we refuse, naming
OPENAI_API_KEY, before the model loads. A ``capability`` given as a list (the original
MM-Vet layout) is read as its comma-joined string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Row
from llavakit.evaluation.judge import Exchange, Judge, JudgedBenchmark

# lmms-eval's MM_VET_PROMPT (including its trailing newline).
GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.
gpt_query_prompt | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501 - the grader's text, verbatim
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
COMBINATIONS = (
    "rec_gen_know", "rec", "spat_ocr", "spat_math_ocr", "rec_spat", "ocr", "math_ocr", "rec_know",
    "rec_spat_gen_ocr", "rec_gen_ocr_know", "rec_spat_ocr", "rec_ocr", "know_spat_ocr", "rec_spat_know",
    "spat_gen_ocr", "rec_spat_math_ocr",
)  # fmt: skip
MAX_TOKENS = 128
ATTEMPTS = 5  # tries per request (lmms-eval's ServerConfig.num_retries default)
RETRY_DELAY = 10.0  # seconds between tries (ServerConfig.retry_delay default)
PATIENCE = 3  # get_chat_response's requests until a non-empty reply
RATE_LIMIT_SLEEP = 5.0
TEMPERATURE_STEP = 0.5
MAX_TEMPERATURE = 2.0  # reaching it ends the grading


def grader_prompt(question: str, answer: str, prediction: str) -> str:
    """The grader prompt for one row (spaces put around the reference's <AND>/<OR>)."""
    reference = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return f"{GRADER_PROMPT}\n{question} | {reference} | {prediction} |"


def parse_grade(reply: str) -> float | None:
    """The grade: ``float`` of the reply before its first space, when within 0.0-1.0; else None."""
    try:
        grade = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return grade if 0.0 <= grade <= 1.0 else None


def capabilities(row: Row) -> str:
    """The row's ``capability`` as lmms-eval reads it: a comma-joined string."""
    value = row["capability"]
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    if not isinstance(value, str) or not value:
        raise DataError(
            f"mmvet question {row.get('question_id')!r}: 'capability' is {row['capability']!r}, expected the "
            "comma-joined capabilities (e.g. 'rec,ocr')"
        )
    return value


class MMVet(JudgedBenchmark):
    """lmms-eval's ``mmvet`` task."""

    id = "mmvet"
    dataset = "lmms-lab-encoder/MMVet"
    split = "test"
    columns = ("question_id", "question", "answer", "capability")
    id_column = "question_id"
    max_new_tokens = 1024
    until = ("\n\n",)  # lmms-eval's default stop (the few-shot delimiter) when the YAML names none
    pre_prompt = "First please perform reasoning, and think step by step to provide best answer to the following question: \n\n"  # noqa: E501
    headline = ("gpt_eval_score",)

    def doc_to_text(self, row: Row) -> str:
        return f"{self.pre_prompt}{row['question']}{self.post_prompt}"

    def process_results(self, row: Row, prediction: str) -> dict[str, Any]:
        judge = self.require_judge()
        # lmms-eval strips generated answers before a task's process_results sees them
        prompt = grader_prompt(row["question"], row["answer"], prediction.strip())
        grade, outcome = self._grade(judge, row["question_id"], prompt)
        return {
            "score": grade,
            "capability": capabilities(row),
            "judge_failed": int(outcome == "failed"),
            "judge_unparsed": int(outcome == "unparsed"),
        }

    def _grade(self, judge: Judge, question_id: Any, prompt: str) -> tuple[float, str]:
        """(grade, "ok" | "failed" | "unparsed"), raising the temperature after each unreadable grade."""
        temperature = 0.0
        while temperature < MAX_TEMPERATURE:
            reply = self._reply(judge, question_id, prompt, temperature)
            if reply is None:
                return 0.0, "failed"
            grade = parse_grade(reply)
            if grade is not None:
                return grade, "ok"
            temperature += TEMPERATURE_STEP
        return 0.0, "unparsed"

    def _reply(self, judge: Judge, question_id: Any, prompt: str, temperature: float) -> str | None:
        """A non-empty reply within ``PATIENCE`` requests (lmms-eval's ``get_chat_response``), else None."""
        for _ in range(PATIENCE):
            exchange = judge.ask(prompt, temperature, MAX_TOKENS, ATTEMPTS, RETRY_DELAY)
            judge.record(self.id, question_id, prompt, temperature, exchange, _logged_grade(exchange))
            if exchange.content:
                return exchange.content
            if exchange.error and "Rate limit" in exchange.error:
                judge.sleep(RATE_LIMIT_SLEEP)
        return None

    def aggregate(self, results: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        scores = list(results["score"])
        caps = list(results["capability"])
        metrics: dict[str, float] = {"gpt_eval_score": sum(scores) / len(scores) * 100}
        for cap in CAPABILITIES:
            # lmms-eval's substring test, on the comma-joined string
            chosen = [score for score, text in zip(scores, caps) if cap in text]
            if chosen:
                metrics[f"capability/{cap}"] = sum(chosen) / len(chosen) * 100
        for combination in COMBINATIONS:
            wanted = set(combination.split("_"))
            chosen = [score for score, text in zip(scores, caps) if set(text.split(",")) == wanted]
            if chosen:
                metrics[f"capability_detail/{combination}"] = sum(chosen) / len(chosen) * 100
        metrics["judge/failed"] = sum(results["judge_failed"])
        metrics["judge/unparsed"] = sum(results["judge_unparsed"])
        return metrics


def _logged_grade(exchange: Exchange) -> float | None:
    return None if exchange.failed else parse_grade(exchange.content)


BENCHMARKS = (MMVet(),)
