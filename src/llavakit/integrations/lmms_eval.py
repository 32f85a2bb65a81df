"""lmms-eval's ``llavakit`` model: run a llavakit checkpoint through lmms-eval's own CLI and task definitions.

    lmms-eval --model llavakit --model_args pretrained=runs/demo/final --tasks mme --batch_size 16
    accelerate launch --num_processes 8 -m lmms_eval --model llavakit --model_args pretrained=DIR --tasks mme

lmms-eval finds the model through the ``lmms_eval.models`` entry point
(`llavakit.integrations.lmms_eval_manifest`); this module is imported by lmms-eval only, never by ``import
llavakit``.

``--model_args``: ``pretrained`` (checkpoint folder, llavakit or llava-hf layout; required), ``dtype``
(``float32``, ``bfloat16``, ``float16``; default ``auto``: the checkpoint's), ``device`` (default: CUDA when
available); ``--batch_size N`` (an integer; ``auto`` is not supported) and ``--device`` come from lmms-eval's
CLI.

How requests are answered, with the inference API that ``llavakit chat`` and ``llavakit eval`` use:

- **Prompt.** lmms-eval's context (the task's ``doc_to_text`` with its default ``lmms_eval_specific_kwargs``)
  is the user turn of the checkpoint's own chat template and system prompt; images are preprocessed with the
  checkpoint's image spec. Images go before the text, one ``<image>`` line each, as in LLaVA's training data
  (`llavakit.inference.prompts.user_text`); a context that already holds ``<image>`` placeholders is used as
  it is, one placeholder per image.
- **Batching.** Requests with equal ``gen_kwargs`` are grouped, sorted by prompt length (text tokens plus the
  exact visual-token count), longest first, and cut into batches of ``batch_size`` rows, left-padded. Answers
  come back in request order.
- **gen_kwargs.** ``max_new_tokens`` (default 1024, as lmms-eval's LLaVA models); sampling with
  ``temperature`` and ``top_p`` when ``temperature > 0``, greedy otherwise (the rule of lmms-eval's LLaVA
  models: ``do_sample`` alone does not switch); ``num_beams > 1`` is refused. Each answer is cut at the first
  of the ``until`` strings (the API's contract; note lmms-eval adds ``until: ["\\n\\n"]`` to tasks that name
  none, and its own ``llava``/``llava_hf`` models ignore ``until``). The chat template's stop tokens and EOS
  end generation as in ``llavakit chat``.
- **Data parallel.** Under ``accelerate launch`` each process loads the model on its own GPU; lmms-eval deals
  the requests to ranks and gathers the answers.
- **loglikelihood** (multiple-choice "ppl" tasks): the continuation is the assistant's reply to the context in
  the chat template; the result is the summed log-probability of the reply's tokens, end-of-turn token
  included (the probability that the model answers exactly this and stops), and whether greedy decoding picks
  every one of them. lmms-eval's ``llava``/``llava_hf`` return the mean token *loss* there instead (positive,
  so a higher value means a worse fit); we return what the API documents, a log-probability, so ``argmax``
  picks the likeliest choice.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from llavakit.anyres.geometry import count_visual_tokens
from llavakit.anyres.pixels import ImageSource, image_size
from llavakit.data.formats import IMAGE_PLACEHOLDER
from llavakit.data.prepare import default_tiling
from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.errors import ConfigError, DataError, ImageError
from llavakit.inference.api import Assistant, load
from llavakit.inference.images import encode_prepared
from llavakit.inference.prompts import Request, user_text

# lmms-eval's LLaVA models' answer length when a task's generation_kwargs name none.
DEFAULT_MAX_NEW_TOKENS = 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class _Prompt:
    """One request's user text and images, and where it sits in the request list."""

    index: int
    text: str
    images: tuple[ImageSource, ...]
    length: int = 0


class LlavaKit(lmms):
    """A llavakit checkpoint as an lmms-eval model (see the module docstring).

    Args:
        pretrained: checkpoint folder.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default CUDA when available. Ignored under ``accelerate
            launch`` with several processes, where each uses its own local GPU.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: rows per generation batch (lmms-eval's ``--batch_size``).
        kwargs: anything else is refused, naming the accepted arguments.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # lmms-eval passes its CLI's --max_batch_size along; it only serves batch_size=auto, refused below.
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ConfigError(
                f"unknown --model_args for llavakit: {sorted(kwargs)}; accepted: pretrained, device, dtype "
                "(and lmms-eval's --batch_size)"
            )
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            device = str(accelerator.device)
        self.assistant: Assistant = load(pretrained, device=device, dtype=_parse_dtype(dtype))
        self.batch_size = _parse_batch_size(batch_size)
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer requests (args: context, gen_kwargs, doc_to_visual, doc_id, task, split) in batches."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        answers: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="llavakit responding", disable=self.rank != 0) as bar:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[1]
                sampling, until = generation_settings(gen_kwargs)
                planned = sorted(
                    (self._prompt(index, requests[index].args, with_length=True) for index in indices),
                    key=lambda prompt: (-prompt.length, prompt.index),
                )
                for start in range(0, len(planned), self.batch_size):
                    # The plan kept no images (a whole task's would fill memory): fetch the batch's again.
                    batch = [
                        self._prompt(p.index, requests[p.index].args)
                        for p in planned[start : start + self.batch_size]
                    ]
                    texts = self.assistant.generate_requests(
                        [_request(prompt) for prompt in batch], **sampling
                    )
                    for prompt, text in zip(batch, texts):
                        answers[prompt.index] = cut_at(text, until)
                        self.cache_hook.add_partial(
                            "generate_until",
                            (requests[prompt.index].args[0], gen_kwargs),
                            answers[prompt.index],
                        )
                    bar.update(len(batch))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request (context, continuation, doc_to_visual, doc_id, task, split): (log-prob, is greedy)."""
        results = []
        for index, request in enumerate(tqdm(requests, desc="llavakit scoring", disable=self.rank != 0)):
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            results.append(self._score(self._prompt(index, request.args), continuation))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: multi-round tasks feed the model's earlier answers back through a task callback."""
        raise NotImplementedError(
            "llavakit's lmms-eval model does not implement generate_until_multi_round (multi-round tasks); "
            "use single-round generate_until tasks, or llavakit's own Assistant.chat for multi-turn chats"
        )

    def _prompt(self, index: int, args: tuple, with_length: bool = False) -> _Prompt:
        """The user text and images of a request; with ``with_length``, its prompt length and no images."""
        context, _, doc_to_visual, doc_id, task, split = args
        images = _as_images(doc_to_visual(self.task_dict[task][split][doc_id]))
        if IMAGE_PLACEHOLDER not in context:
            text = user_text(context, len(images))
        elif context.count(IMAGE_PLACEHOLDER) == len(images):
            text = context
        else:
            raise DataError(
                f"{task} doc {doc_id}: the context holds {context.count(IMAGE_PLACEHOLDER)} "
                f"{IMAGE_PLACEHOLDER} placeholders but doc_to_visual gave {len(images)} images"
            )
        if not with_length:
            return _Prompt(index, text, images)
        try:
            sizes = [image_size(image) for image in images]
        except ImageError as err:
            raise ImageError(f"{task} doc {doc_id}: {err}") from err
        spec = self.assistant.model.config.image_spec
        visual = sum(count_visual_tokens(s, spec, tiled=t) for s, t in zip(sizes, default_tiling(len(sizes))))
        text_tokens = len(self.assistant.tokenizer(text, add_special_tokens=False)["input_ids"])
        return _Prompt(index, text, (), text_tokens + visual)

    @torch.inference_mode()
    def _score(self, prompt: _Prompt, continuation: str) -> tuple[float, bool]:
        """Log-probability of ``continuation`` replying to ``prompt`` (end of turn included), greediness."""
        builder = self.assistant.prompts
        user = Turn(USER, prompt.text)
        question = builder.encode(Request(Conversation((user,)), prompt.images))
        spec = self.assistant.model.config.image_spec
        counts = [count_visual_tokens(image.size, spec, tiled=image.tiled) for image in question.images]
        sample = builder.encoder.encode(Conversation((user, Turn(ASSISTANT, continuation))), counts)
        model = self.assistant.model
        parameter = next(model.parameters())
        input_ids = torch.tensor([sample.input_ids], device=parameter.device)
        features = None
        if question.images:
            features = encode_prepared(
                model, question.images, self.assistant.feature_cache, self.assistant.model_key
            )
        embeds = model.embed_inputs(input_ids, image_features=features)
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids)).logits[0, :-1]
        targets = torch.tensor(sample.labels[1:], device=parameter.device)
        # Only the reply: some templates also supervise tokens inside the prompt (always-trained tokens).
        scored = (targets != IGNORE_INDEX) & (
            torch.arange(len(targets), device=targets.device) >= len(question.input_ids) - 1
        )
        if not bool(scored.any()):
            raise DataError(
                f"the continuation {continuation!r} adds no token to the prompt: nothing to score"
            )
        log_probs = torch.log_softmax(logits[scored].float(), dim=-1)
        picked = log_probs.gather(1, targets[scored].unsqueeze(1))
        greedy = bool((log_probs.argmax(dim=-1) == targets[scored]).all())
        return float(picked.sum()), greedy


def generation_settings(gen_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """lmms-eval ``gen_kwargs`` → (`SamplingParams` fields, ``until`` strings); see the module docstring."""
    num_beams = int(gen_kwargs.get("num_beams") or 1)
    if num_beams != 1:
        raise ConfigError(
            f"num_beams={num_beams}: llavakit generates greedily or by sampling, not by beam search"
        )
    sampling: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    }
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if temperature > 0:
        sampling.update(do_sample=True, temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
    else:
        sampling["do_sample"] = False
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    return sampling, tuple(stop for stop in until if stop)


def cut_at(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first occurrence of any of ``until``."""
    positions = [text.find(stop) for stop in until if stop in text]
    return text[: min(positions)] if positions else text


def _as_images(visuals: Any) -> tuple[ImageSource, ...]:
    """``doc_to_visual``'s value (a list, one image, or None for a text-only question) as a tuple."""
    if visuals is None:
        return ()
    return tuple(visuals) if isinstance(visuals, (list, tuple)) else (visuals,)


def _request(prompt: _Prompt) -> Request:
    return Request(Conversation((Turn(USER, prompt.text),)), prompt.images)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _parse_batch_size(batch_size: int | str) -> int:
    try:
        value = int(batch_size)
    except ValueError:
        raise ConfigError(f"--batch_size {batch_size!r}: llavakit needs an integer (no 'auto')") from None
    if value <= 0:
        raise ConfigError(f"--batch_size must be positive, got {value}")
    return value
