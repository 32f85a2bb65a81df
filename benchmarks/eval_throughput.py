"""Evaluation throughput: ``llavakit eval``'s runner against lmms-eval's ``llava_hf`` model, questions per
second.

Both answer the same MME-schema questions (a parquet file of N synthetic questions written here, two per
image, the demo's synthetic scenes as images) with the same checkpoint: the demo's tiny model
(`llavakit.demo.parts`, random weights; or a trained one, e.g. ``--model runs/demo/final``). A and B alternate
round by round in one process, after one warm-up round each, so machine noise hits both alike; each round is a
whole evaluation (data loading, prompting, generation, scoring) with the model already loaded.

- A: `llavakit.evaluation.suite.run_suite` (what ``llavakit eval --benchmark mme --data FILE`` runs):
  length-sorted batches of ``--batch-size`` rows, left-padded, KV-cached greedy generation.
- B: lmms-eval 0.7.3's ``simple_evaluate`` with its ``llava_hf`` model (transformers'
  ``LlavaNextForConditionalGeneration`` and ``LlavaNextProcessor`` loaded from the same folder) on lmms-eval's
  own ``mme.yaml`` pointed at the parquet file. ``llava_hf`` answers one question at a time (it asserts
  ``batch_size == 1``).

The prompts are the same: ``llava_hf`` is given a chat template that renders the checkpoint's own template and
system prompt (checked here against llavakit's rendering), where it would otherwise use Vicuna's long default
system prompt, so both runs process the same tokens.

Making ``llava_hf`` run without torchvision (CPU torch): nothing is needed for the image processor, since
llavakit saves ``LlavaNextImageProcessorPil`` in the checkpoint's ``processor_config.json`` (the PIL backend,
no torchvision; for a llava-hf Hub checkpoint pass ``use_fast=False`` to ``AutoProcessor``). But
``lmms_eval.models.simple.llava_hf`` imports ``decord`` (a video reader) at module level and uses it only for
videos: when decord is not installed this script registers an empty stand-in module under that name before
importing it. And ``device_map=cpu`` must be passed (``--model_args ...,device_map=cpu`` on the CLI):
llava_hf's default ``""`` is refused by transformers 5. lmms-eval itself must be importable (``pip install -e
".[lmms]"`` plus ``pip install --no-deps lmms-eval==0.7.3``, as scripts/install.sh does). lmms-eval's
evaluate() ends by deleting the model's modules (``lm.clean()``); the script puts the transformers model back
before each round.

Run: ``python benchmarks/eval_throughput.py [--questions 32] [--rounds 3] [--batch-size 16] [--model DIR]``.
Not a test: it prints each round's questions/s, the medians and the median per-round ratio (target: llavakit ≥
2× llava_hf).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "llavakit_bench_mme"


def demo_checkpoint(root: Path) -> Path:
    """The demo's model (random weights), saved as a checkpoint folder with its transformers processor."""
    from llavakit.data.synth import SynthConfig, generate_synth, training_corpus
    from llavakit.demo.parts import SYSTEM_PROMPT, build_demo_parts
    from llavakit.model.llava_next import LlavaNextModel

    dataset = generate_synth(root / "corpus", SynthConfig(n_train=64, n_heldout=1))
    parts = build_demo_parts(root / "parts", training_corpus(dataset))
    model = LlavaNextModel.from_parts(**parts.from_parts_kwargs(), system_prompt=SYSTEM_PROMPT)
    return model.save_pretrained(root / "ckpt")


def write_questions(root: Path, questions: int) -> Path:
    """An MME-schema parquet file: ``questions`` yes/no questions, two per synthetic scene (64 to 128 px)."""
    from datasets import Dataset, Features, Image, Value

    from llavakit.data.synth import SynthConfig, generate_synth

    scenes = (questions + 1) // 2
    dataset = generate_synth(root / "scenes", SynthConfig(n_train=scenes, n_heldout=1, seed=7))
    images = sorted((dataset.root / "images" / "train").glob("*.png"))[:scenes]
    rows = []
    for number, path in enumerate(images):
        for answer, thing in (("Yes", "a shape"), ("No", "a dog")):
            rows.append(
                {
                    "question_id": f"existence/{number:04d}.png",
                    "question": f"Is there {thing} in the image? Please answer yes or no.",
                    "answer": answer,
                    "category": "existence" if number % 2 else "OCR",
                    "image": {"bytes": path.read_bytes(), "path": None},
                }
            )
    features = Features(
        {name: Value("string") for name in ("question_id", "question", "answer", "category")}
        | {"image": Image()}
    )
    path = root / "questions" / "mme.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows[:questions], features=features).to_parquet(str(path))
    return path


def write_task(root: Path, data: Path) -> Path:
    """lmms-eval's own ``mme.yaml`` with the local parquet file as its dataset."""
    import lmms_eval

    folder = root / "task"
    folder.mkdir(parents=True, exist_ok=True)
    mme_yaml = Path(lmms_eval.__file__).parent / "tasks" / "mme" / "mme.yaml"
    (folder / f"{TASK}.yaml").write_text(
        f"include: {mme_yaml}\ntask: {TASK}\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n",
        encoding="utf-8",
    )
    return folder


def chat_template_of(assistant) -> str:
    """A Jinja chat template rendering one user message exactly as the checkpoint's own template does."""
    from llavakit.data.schema import USER, Conversation, Turn

    marker = "\x00"
    turn = Turn(USER, marker)
    text = "".join(s.text for s in assistant.template.render(Conversation((turn,)), for_generation=True))
    before, after = text.split(marker)
    return (
        f"{{% raw %}}{before}{{% endraw %}}{{{{ messages[0]['content'] }}}}{{% raw %}}{after}{{% endraw %}}"
    )


def load_llava_hf(checkpoint: Path, chat_template: str):
    """lmms-eval's ``llava_hf`` model on CPU (decord stood in when missing: it is only used for videos)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        sys.modules["decord"] = types.SimpleNamespace(VideoReader=None, cpu=None)
    from lmms_eval.models.simple.llava_hf import LlavaHf

    # device_map: llava_hf's default "" is refused by transformers 5's from_pretrained.
    return LlavaHf(
        pretrained=str(checkpoint),
        device="cpu",
        device_map="cpu",
        dtype="float32",
        chat_template=chat_template,
    )


def check_same_prompt(assistant, llava_hf) -> None:
    """Fail unless llava_hf's processor gives the same token ids as llavakit for one question."""
    from PIL import Image

    from llavakit.data.schema import USER, Conversation, Turn
    from llavakit.evaluation.mme import MME
    from llavakit.inference.prompts import Request

    question = "<image>\n" + MME().doc_to_text({"question": "Is there a dog? Please answer yes or no."})
    image = Image.new("RGB", (128, 64), (200, 30, 30))
    request = Request(Conversation((Turn(USER, question),)), (image,))
    ours = assistant.prompts.batch([request]).input_ids[0].tolist()
    text = llava_hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        chat_template=llava_hf.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = llava_hf._image_processor(images=[image], text=text, return_tensors="pt")
    theirs = inputs["input_ids"][0].tolist()
    if ours != theirs:
        raise SystemExit(f"the two prompts differ:\n  llavakit {ours}\n  llava_hf {theirs}")


def run_llavakit(assistant, checkpoint: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    """One ``llavakit eval`` of the questions; returns the predictions in row order."""
    from llavakit.evaluation.runner import EvalOptions
    from llavakit.evaluation.suite import SuiteConfig, run_suite

    options = EvalOptions(batch_size=batch_size, progress=False)
    config = SuiteConfig(
        model=checkpoint, benchmarks=("mme",), out=out, data={"mme": str(data)}, options=options
    )
    run_suite(config, assistant=assistant)
    lines = (out / "mme" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["prediction"] for record in sorted(map(json.loads, lines), key=lambda r: r["row"])]


def run_lmms_eval(llava_hf, model, task_manager) -> list[str]:
    """One lmms-eval evaluation of the questions with ``llava_hf``; returns the predictions in row order."""
    from lmms_eval.evaluator import simple_evaluate

    # lmms-eval's evaluate() ends with lm.clean(), deleting the model's nn.Module attributes: put it back.
    llava_hf._model = model
    results = simple_evaluate(
        model=llava_hf,
        tasks=[TASK],
        batch_size=1,
        task_manager=task_manager,
        log_samples=True,
        verbosity="ERROR",
    )
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return [sample["filtered_resps"][0] for sample in samples]


def main() -> None:
    """Build or load the checkpoint, write the questions, alternate the two evaluations, print questions/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32, help="synthetic MME questions (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=16, help="llavakit's batch size (default 16)")
    parser.add_argument(
        "--model", type=Path, help="checkpoint folder (default: the demo's model, random weights)"
    )
    args = parser.parse_args()
    import torch
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    import llavakit

    logger.remove()  # lmms-eval logs every request's setup at INFO
    root = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    torch.manual_seed(0)
    checkpoint = args.model or demo_checkpoint(root)
    data = write_questions(root, args.questions)
    assistant = llavakit.load(checkpoint, device="cpu", dtype=torch.float32)
    llava_hf = load_llava_hf(checkpoint, chat_template_of(assistant))
    check_same_prompt(assistant, llava_hf)
    hf_model = llava_hf.model
    task_manager = TaskManager("ERROR", include_path=str(write_task(root, data)), model_name="llava_hf")
    print(f"{args.questions} questions, checkpoint {checkpoint}, torch threads {torch.get_num_threads()}")
    print(f"{'round':>5s} {'llavakit q/s':>13s} {'llava_hf q/s':>13s} {'ratio':>7s}")
    ours_rates, theirs_rates = [], []
    for number in range(args.rounds + 1):
        started = time.perf_counter()
        ours = run_llavakit(assistant, checkpoint, data, root / f"llavakit-{number}", args.batch_size)
        ours_rate = len(ours) / (time.perf_counter() - started)
        started = time.perf_counter()
        theirs = run_lmms_eval(llava_hf, hf_model, task_manager)
        theirs_rate = len(theirs) / (time.perf_counter() - started)
        label = "warm" if number == 0 else str(number)
        print(f"{label:>5s} {ours_rate:13.2f} {theirs_rate:13.2f} {ours_rate / theirs_rate:6.2f}x")
        if number:
            ours_rates.append(ours_rate)
            theirs_rates.append(theirs_rate)
    same = sum(a == b for a, b in zip(ours, theirs))
    # Each round's two runs are adjacent in time, so the median of the per-round ratios is the steadiest
    # figure on a shared machine.
    ratio = statistics.median(a / b for a, b in zip(ours_rates, theirs_rates))
    print(
        f"median q/s: llavakit {statistics.median(ours_rates):.2f}, "
        f"llava_hf {statistics.median(theirs_rates):.2f}; "
        f"median ratio {ratio:.2f}x"
    )
    print(f"identical answers: {same}/{len(ours)} (greedy, same checkpoint; float noise may flip near-ties)")


if __name__ == "__main__":
    main()
