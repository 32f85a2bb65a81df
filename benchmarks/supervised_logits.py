"""Training step time: logits of the supervised positions only (`llavakit.model.loss`) against the LLM's own loss.

Why: a LLaVA sample supervises only its answers, yet the LLM's own loss projects every position onto the
vocabulary and runs a float32 log-softmax over all of them. Both runs use the demo's model and finetune data
(``llavakit demo``'s synthetic instructions, vicuna_v1 template, AnyRes tiles), the same batches and AdamW, in one
process, alternating step by step so machine noise hits both alike. ``--vocab`` resizes the LLM's vocabulary (the
demo's is 512; Llama-2's 32,000, Qwen2's 151,936) to show how the saving grows with it.

Run: ``python benchmarks/supervised_logits.py [--steps 20] [--vocab 512 32000]``. It is not a test; it prints the
milliseconds per step of each mode and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def demo_trainer(root: Path, batch: int):
    """The demo's finetune stage, built (model, optimizer, data) but not run."""
    from llavakit.data.synth import SynthConfig, generate_synth, training_corpus
    from llavakit.demo.parts import build_demo_parts
    from llavakit.demo.run import DemoOptions, demo_config
    from llavakit.distributed import init_distributed
    from llavakit.training.data import build_train_data
    from llavakit.training.trainer import Trainer

    dataset = generate_synth(root / "data", SynthConfig(n_train=256, n_heldout=1))
    parts = build_demo_parts(root / "parts", training_corpus(dataset))
    overrides = (f"stages.1.global_batch_size={batch}", f"stages.1.micro_batch_size={batch}")
    config = demo_config(DemoOptions(out_dir=root, progress=False, overrides=overrides), dataset, parts)
    trainer = Trainer(config, 1, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    return trainer


def time_steps(trainer, batches: list[dict], supervised_only: bool) -> list[float]:
    """Seconds of forward + backward + AdamW step for each batch."""
    from llavakit.training.trainer import _model_inputs

    seconds = []
    for batch in batches:
        started = time.perf_counter()
        inputs = {**_model_inputs(batch, torch.device("cpu")), "supervised_logits_only": supervised_only}
        trainer.model(**inputs).loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    """Build the demo's finetune stage once per vocabulary size, time both modes alternately, print ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=16, help="samples per step (the demo's batch)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 32000], help="LLM vocabulary sizes to run")
    args = parser.parse_args()
    from llavakit.model.loss import supervised_mask

    torch.manual_seed(0)
    print(f"{'vocab':>7s} {'own loss ms':>12s} {'supervised ms':>14s} {'speed-up':>9s} {'supervised share':>17s}")
    for vocab in args.vocab:
        trainer = demo_trainer(Path(tempfile.mkdtemp(prefix="bench-logits-")), args.batch)
        trainer.model.llm.resize_token_embeddings(vocab, mean_resizing=False)
        trainer.optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-4)
        stream = trainer.micro_batches()
        batches = [next(stream) for _ in range(args.steps + 2)]
        full, supervised = [], []
        for index, batch in enumerate(batches):
            for mode, times in ((False, full), (True, supervised)):
                step = time_steps(trainer, [batch], mode)
                if index >= 2:
                    times += step
        share = sum(int(supervised_mask(b["labels"]).sum()) for b in batches) / sum(b["labels"].numel() for b in batches)
        full_ms, supervised_ms = 1000 * sum(full) / len(full), 1000 * sum(supervised) / len(supervised)
        print(f"{vocab:7d} {full_ms:12.1f} {supervised_ms:14.1f} {full_ms / supervised_ms:8.2f}x {share:17.1%}")


if __name__ == "__main__":
    main()
