"""Token generation on a `LlavaNextModel`: greedy or sampled, KV-cached, batched with left padding.

The decoding loop is transformers' ``generate`` on the LLM, fed the multimodal ``inputs_embeds`` built by
`LlavaNextModel.generate` (the field's trusted implementation of KV caching, left-padding position ids,
temperature and top-p), so llavakit only decides *what* to generate with and *when to stop*:

- stop ids: the tokenizer's EOS plus every stop string of the chat template that is a single token (``</s>``,
  ``<|im_end|>``); longer stop strings are cut from the decoded text;
- ``seed``: sampling runs inside ``torch.random.fork_rng`` so a seeded call is reproducible without changing the
  caller's global RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llavakit.data.templates import ChatTemplate
from llavakit.errors import ConfigError
from llavakit.inference.feature_cache import ImageFeatureCache
from llavakit.inference.images import encode_prepared
from llavakit.inference.prompts import GenerationBatch
from llavakit.inference.videos import video_inputs
from llavakit.model.llava_next import LlavaNextModel


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        max_new_tokens: generated tokens per row at most.
        do_sample: False = greedy (argmax); True = sample with ``temperature`` and ``top_p``.
        temperature: softmax temperature (> 0) when sampling.
        top_p: nucleus sampling mass in (0, 1].
        seed: seed of the sampling RNG (None: the global torch RNG as it is).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def stop_token_ids(tokenizer: object, template: ChatTemplate) -> list[int]:
    """The tokenizer's EOS id plus the ids of the template's single-token stop strings."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for text in template.stop_strings:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise ConfigError("the tokenizer has no EOS token and the template no single-token stop string")
    return ids


@torch.no_grad()
def generate_ids(
    model: LlavaNextModel,
    batch: GenerationBatch,
    params: SamplingParams,
    stop_ids: list[int],
    pad_id: int,
    cache: ImageFeatureCache | None = None,
    model_key: str = "",
) -> torch.Tensor:
    """Generate new tokens for a left-padded batch.

    Args:
        model: the model (its device and dtype are used).
        batch: `GenerationBatch` from `llavakit.inference.prompts.PromptBuilder`.
        params: sampling settings.
        stop_ids: ids that end a row.
        pad_id: id written after a row has stopped.
        cache: image-feature cache (None: encode every image).
        model_key: this model's key in ``cache``.

    Returns:
        ``[B, n]`` new token ids (n ≤ ``max_new_tokens``), ``pad_id`` after each row's stop token.
    """
    device = next(model.parameters()).device
    features = encode_prepared(model, batch.images, cache, model_key) if batch.images else None
    videos = video_inputs(batch.videos, device, next(model.projector.parameters()).dtype)
    options = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": params.do_sample,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if params.do_sample:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:
        # Note: the checkpoint's generation_config may hold sampling defaults; greedy must not inherit them.
        options.update(temperature=None, top_p=None, top_k=None)
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return model.generate(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            image_features=features,
            **videos,
            **options,
        )


def decode(tokenizer: object, ids: torch.Tensor, template: ChatTemplate) -> list[str]:
    """Text of each row of ``ids``: special tokens dropped, cut at the first template stop string, stripped."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [cut_at_stop(text, template.stop_strings).strip() for text in texts]


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """``text`` up to the first occurrence of any stop string (whole when none occurs)."""
    positions = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return text[: min(positions)] if positions else text
