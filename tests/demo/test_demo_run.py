"""The shortened demo (``llavakit demo --quick``) end to end: the loss falls, accuracy beats chance, the outputs are
written, and the final checkpoint answers the same in transformers (no llavakit code) as through `llavakit.load`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import PIL
import pytest
import torch

from llavakit.cli.main import main
from llavakit.data.synth import NUMBERS
from llavakit.demo.parts import SYSTEM_PROMPT
from llavakit.demo.run import QUICK_EVAL_EVERY, QUICK_STEPS
from llavakit.evaluation.heldout import HELDOUT

pytestmark = pytest.mark.slow

# The transformers side runs in a fresh interpreter that never imports llavakit.
TRANSFORMERS_ANSWERS = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
path, requests = sys.argv[1], json.loads(sys.argv[2])
model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
processor = AutoProcessor.from_pretrained(path)
answers = []
for prompt, image in requests:
    inputs = processor(images=[Image.open(image).convert("RGB")], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    answers.append(text.strip())
assert "llavakit" not in sys.modules
print(json.dumps(answers))
"""


# --quick has fewer held-out questions than CURVE_QUESTIONS: a smaller prefix makes its curve a part, as in a full run.
CURVE_PREFIX = 60


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llavakit.demo.run.CURVE_QUESTIONS", CURVE_PREFIX)
        assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_outputs_are_written(demo_run):
    for name in ("metrics.json", "loss.png", "accuracy.png", "final/config.json", "final/model.safetensors"):
        assert (demo_run / name).is_file(), name
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert (
        set(metrics["accuracy"])
        == set(metrics["accuracy_text_only"])
        == set(metrics["accuracy_majority_answer"])
    )
    assert metrics["seconds"]["train"] > 0 and all(v > 0 for v in metrics["tokens_per_s"].values())
    environment = metrics["environment"]
    assert environment["packages"]["pillow"] == PIL.__version__ and environment["torch_threads"] >= 1
    assert environment["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_learning_curve_is_measured_during_finetuning_on_a_prefix_of_the_held_out_questions(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    curve = metrics["learning_curve"]
    every, steps = QUICK_EVAL_EVERY, QUICK_STEPS[1]
    assert [point["step"] for point in curve] == [*range(every, steps, every), steps]
    assert metrics["learning_curve_questions"] == CURVE_PREFIX < sum(metrics["questions_per_type"].values())
    data = next((demo_run / "data").iterdir())
    asked = Counter(row["type"] for row in HELDOUT.read_jsonl(data / "heldout.jsonl")[:CURVE_PREFIX])
    for point in curve:
        assert set(point["accuracy"]) == set(asked)
        # Each score is a share of that type's questions among the asked ones.
        assert all(round(accuracy * asked[kind], 6) % 1 == 0 for kind, accuracy in point["accuracy"].items())
    assert metrics["seconds"]["curve"] > 0
    # The curve went through the finetune stage's eval section: its evaluations are logged with the training metrics.
    eval_log = (demo_run / "train" / "finetune" / "eval.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in eval_log]
    assert [row["step"] for row in logged] == [point["step"] for point in curve[:-1]]
    counts = [row["metrics"]["heldout"]["accuracy/count"] for row in logged]
    assert counts == [point["accuracy"]["count"] for point in curve[:-1]]


def test_the_final_evaluation_went_through_the_runner(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    for name, key in (("heldout", "accuracy"), ("heldout_text_only", "accuracy_text_only")):
        summary = json.loads((demo_run / "eval" / name / "metrics.json").read_text())
        assert summary["benchmark"] == name and summary["failed"] == 0
        per_type = {k.removeprefix("accuracy/"): v for k, v in summary["metrics"].items() if "/" in k}
        assert per_type == metrics[key]
        lines = (demo_run / "eval" / name / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == sum(metrics["questions_per_type"].values())


def test_loss_falls_and_accuracy_beats_chance(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    for stage, losses in metrics["losses"].items():
        assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, stage
    # Chance: a uniform guess among the count answers (one..four); counting is what a short run learns first.
    assert metrics["accuracy"]["count"] > 1 / (len(NUMBERS) - 1), metrics["accuracy"]
    assert metrics["accuracy_all"] > metrics["accuracy_all_text_only"], metrics


def test_final_checkpoint_answers_the_same_in_transformers(demo_run):
    import llavakit
    from llavakit.data.schema import USER, Conversation, Turn

    assistant = llavakit.load(demo_run / "final", device="cpu")
    data = next((demo_run / "data").iterdir())
    examples = HELDOUT.read_jsonl(data / "heldout.jsonl")[:6]
    requests = []
    for example in examples:
        turn = Turn(USER, f"<image>\n{example['question']}")
        prompt = "".join(
            s.text for s in assistant.template.render(Conversation((turn,)), for_generation=True)
        )
        # The system prompt the finetune stage trained with, saved in the checkpoint.
        assert prompt.startswith(f"{SYSTEM_PROMPT} USER: <image>")
        requests.append((prompt, example["image"][0]))
    ours = [
        assistant.chat(image, ex["question"], max_new_tokens=8)[0]
        for (_, image), ex in zip(requests, examples)
    ]
    done = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ANSWERS, str(demo_run / "final"), json.dumps(requests)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ours


def test_a_negative_curve_interval_is_refused_before_any_work(tmp_path):
    from llavakit.demo.run import DemoOptions
    from llavakit.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        DemoOptions(out_dir=tmp_path, eval_every=-1)
    assert DemoOptions(eval_every=0).curve_interval == 0
    assert DemoOptions(quick=True).curve_interval == QUICK_EVAL_EVERY


def test_the_demo_tokenizer_learns_the_recipe_s_chat_texts():
    from llavakit.demo import parts
    from llavakit.demo.run import RECIPE
    from llavakit.training.recipes import recipe_dict

    finetune = recipe_dict(RECIPE)["stages"][-1]["data"]
    assert (finetune["template"], finetune["system_prompt"]) == (parts.TEMPLATE, parts.SYSTEM_PROMPT)
