"""lmms-eval's ``--model llavakit``: lmms-eval's own CLI and MME task definition run our model on a local
dataset.

The checkpoint is the tiny random ``debug-clip-llama`` with its LM head rigged to answer only "Yes" or "No"
(the sign of one projection of the last hidden state), so MME's yes/no scorer gives non-trivial,
input-dependent scores. Oracles: our own `Assistant.generate` for the predictions, `llavakit.evaluation.score`
for the metrics, and transformers' ``LlavaNextForConditionalGeneration`` (no llavakit code) for the
log-likelihoods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_fixtures import png_bytes, write_parquet
from PIL import Image

import llavakit
from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.evaluation import score
from llavakit.evaluation.mme import MME
from llavakit.inference.prompts import Request

lmms_eval = pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance  # noqa: E402

TASK = "llavakit_mme_local"


@pytest.fixture(scope="module")
def checkpoint(preset_parts, tmp_path_factory):
    """A saved tiny checkpoint whose LM head scores only "Yes" (+v) and "No" (-v): it answers YesYes/NoNo.

    v is the difference of the last hidden states of the first two MME questions, so the first is answered Yes
    and the second No (a random v gave the same answer to every question).
    """
    from llavakit.inference.api import Assistant
    from llavakit.inference.images import encode_prepared
    from llavakit.model.llava_next import LlavaNextModel

    torch.manual_seed(0)
    model = LlavaNextModel.from_parts(**preset_parts("debug-clip-llama").from_parts_kwargs()).eval()
    head = model.llm.get_output_embeddings()
    yes, no = (model.tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("Yes", "No"))
    assert len(yes) == len(no) == 1, "the debug tokenizer must hold Yes and No as single tokens"
    last_hidden = []
    hook = head.register_forward_hook(lambda module, args, output: last_hidden.append(args[0][0, -1]))
    builder = Assistant(model).prompts
    with torch.no_grad():
        for row in _rows()[:2]:
            turn = Turn(USER, f"<image>\n{MME().doc_to_text(row)}")
            batch = builder.batch([Request(Conversation((turn,)), (row["image"],))])
            features = encode_prepared(model, batch.images)
            model(
                inputs_embeds=model.embed_inputs(batch.input_ids, image_features=features),
                attention_mask=batch.attention_mask,
            )
        hook.remove()
        head.weight.zero_()
        head.weight[yes[0]] = last_hidden[0] - last_hidden[1]
        head.weight[no[0]] = last_hidden[1] - last_hidden[0]
    return model.save_pretrained(tmp_path_factory.mktemp("lmms") / "ckpt")


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return llavakit.load(checkpoint, device="cpu")


def _rows() -> list[dict]:
    """MME's schema: 4 images of different shapes and colours, two questions each (answers Yes and No)."""
    images = [
        ("existence", (40, 24), (200, 30, 30)),
        ("existence", (24, 40), (30, 200, 30)),
        ("OCR", (32, 32), (30, 30, 200)),
        ("code_reasoning", (48, 16), (220, 220, 20)),
    ]
    rows = []
    for number, (category, size, colour) in enumerate(images):
        for answer, thing in (("Yes", "a shape"), ("No", "a dog")):
            rows.append(
                {
                    "question_id": f"{category}/{number:04d}.png",
                    "question": f"Is there {thing} in image {number}? Please answer yes or no.",
                    "answer": answer,
                    "category": category,
                    "image": png_bytes(size, colour),
                }
            )
    return rows


def _write_task(folder: Path, rows: list[dict]) -> Path:
    """lmms-eval's own ``mme.yaml`` (prompt, generation kwargs, scorer) pointed at a local parquet file."""
    data = write_parquet(folder / "mme_local.parquet", rows)
    mme_yaml = Path(lmms_eval.__file__).parent / "tasks" / "mme" / "mme.yaml"
    (folder / f"{TASK}.yaml").write_text(
        f"include: {mme_yaml}\ntask: {TASK}\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n",
        encoding="utf-8",
    )
    return folder


def _run_lmms_eval(checkpoint: Path, task_dir: Path, out: Path, home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "lmms_eval", "eval", "--model", "llavakit",
        "--model_args", f"pretrained={checkpoint},device=cpu", "--tasks", TASK,
        "--include_path", str(task_dir),
        "--batch_size", "3", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_lmms_eval_cli_runs_our_model_on_its_mme_task(checkpoint, assistant, tmp_path):
    rows = _rows()
    task_dir = _write_task(tmp_path / "task", rows)
    run = _run_lmms_eval(checkpoint, task_dir, tmp_path / "out", tmp_path / "hf")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    (samples_file,) = (tmp_path / "out").rglob(f"*_samples_{TASK}.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()),
        key=lambda sample: sample["doc_id"],
    )
    assert [sample["doc_id"] for sample in samples] == list(range(len(rows)))
    # lmms-eval's prompt is our MME prompt; the images go before it, one <image> line each.
    assert [sample["input"] for sample in samples] == [MME().doc_to_text(row) for row in rows]
    expected = assistant.generate(
        [f"<image>\n{sample['input']}" for sample in samples],
        images=[[row["image"]] for row in rows],
        max_new_tokens=MME.max_new_tokens,
    )
    # lmms-eval adds until=["\n\n"] to MME's generation kwargs; the plug-in cuts answers there.
    predictions = [sample["filtered_resps"] for sample in samples]
    assert predictions == [answer.split("\n\n")[0] for answer in expected]
    assert {answer[:2] for answer in predictions} == {"Ye", "No"}, "the rigged model should answer both ways"
    theirs = json.loads(results_file.read_text(encoding="utf-8"))["results"][TASK]
    ours = score("mme", [{**row, "prediction": p} for row, p in zip(rows, predictions)])
    assert theirs["mme_perception_score,none"] == pytest.approx(ours["mme_perception_score"])
    assert theirs["mme_cognition_score,none"] == pytest.approx(ours["mme_cognition_score"])
    assert 0 < ours["mme_perception_score"] + ours["mme_cognition_score"] < 1200


@pytest.fixture(scope="module")
def plugin(checkpoint):
    """The lmms-eval model as lmms-eval builds it, with a one-document task of each kind."""
    from lmms_eval.models import get_model

    model = get_model("llavakit").create_from_arg_string(
        f"pretrained={checkpoint},device=cpu", {"batch_size": 2}
    )
    image = Image.open(__import__("io").BytesIO(png_bytes((40, 24)))).convert("RGB")
    model.task_dict = {"t": {"test": [{"image": image}, {"image": None}]}}
    return model


def _instance(request_type: str, context: str, second: object, doc_id: int) -> Instance:
    def doc_to_visual(doc):
        return [] if doc["image"] is None else [doc["image"]]

    arguments = (context, second, doc_to_visual, doc_id, "t", "test")
    return Instance(request_type, arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_image_placement_batching_and_gen_kwargs(plugin, assistant):
    image = plugin.task_dict["t"]["test"][0]["image"]
    greedy = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    requests = [
        _instance("generate_until", "Is it red?", greedy, 0),
        _instance("generate_until", "<image>\nIs it red?", greedy, 0),  # placeholder given: not added again
        _instance("generate_until", "Describe the weather today.", greedy, 1),  # text only
        _instance(
            "generate_until", "Is it red?", {**greedy, "until": ["Yes"]}, 0
        ),  # cut before the first Yes
    ]
    answers = plugin.generate_until(requests)
    expected = assistant.generate(
        ["<image>\nIs it red?", "Describe the weather today."], images=[[image], []], max_new_tokens=5
    )
    assert answers[:3] == [expected[0], expected[0], expected[1]]
    assert answers[3] == expected[0].split("Yes")[0]
    with pytest.raises(Exception, match="num_beams"):
        plugin.generate_until([_instance("generate_until", "Is it red?", {"num_beams": 3}, 0)])
    with pytest.raises(NotImplementedError, match="multi_round"):
        plugin.generate_until_multi_round(requests)


def test_loglikelihood_equals_transformers_log_probabilities(plugin, assistant, checkpoint):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    reference = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = plugin.task_dict["t"]["test"][0]["image"]
    continuations = ["Yes", "No", "Yes Yes"]
    results = plugin.loglikelihood([_instance("loglikelihood", "Is it red?", c, 0) for c in continuations])
    user = Turn(USER, "<image>\nIs it red?")
    prompt = "".join(s.text for s in assistant.template.render(Conversation((user,)), for_generation=True))
    start = processor(images=[image], text=prompt, return_tensors="pt")["input_ids"].shape[1]
    for continuation, (log_prob, greedy) in zip(continuations, results):
        conversation = Conversation((user, Turn(ASSISTANT, continuation)))
        text = "".join(s.text for s in assistant.template.render(conversation))
        inputs = processor(images=[image], text=text, return_tensors="pt")
        with torch.no_grad():
            logits = reference(**inputs).logits[0].float()
        targets = inputs["input_ids"][0, start:]
        expected = torch.log_softmax(logits[start - 1 : -1], dim=-1).gather(1, targets[:, None]).sum()
        assert log_prob == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool((logits[start - 1 : -1].argmax(-1) == targets).all())
    # The rigged head never predicts the end of turn, so no reply is greedy end to end; Yes and No differ.
    assert not any(greedy for _, greedy in results) and results[0][0] != results[1][0]


def test_import_llavakit_needs_no_lmms_eval_and_the_entry_point_is_registered():
    code = (
        "import sys, importlib.metadata as m, llavakit, llavakit.integrations as i;"
        "assert 'lmms_eval' not in sys.modules;"
        "(ep,) = [e for e in m.entry_points(group='lmms_eval.models') if e.name == 'llavakit'];"
        "print(ep.load().__name__, i.MODEL_CLASS)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["lmms_eval_manifest", "llavakit.integrations.lmms_eval.LlavaKit"]
