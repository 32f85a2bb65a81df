"""The models one server process serves, each with its own generation engine, sharing one image-feature cache.

This is the original LLaVA's controller + model workers on one machine: clients pick a model by the request's
``model`` field; every model answers through its own continuous-batching `GenerationEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llavakit.inference.api import Assistant, load
from llavakit.inference.engine import GenerationEngine
from llavakit.inference.feature_cache import ImageFeatureCache
from llavakit.serving.config import ServeConfig
from llavakit.serving.errors import APIError


@dataclass
class ServedModel:
    """A loaded model under its served name.

    Attributes:
        name: the id clients send as ``model``.
        assistant: the model with its tokenizer, template and prompt builder.
        engine: its continuous-batching loop.
        context_length: prompt + answer tokens at most.
    """

    name: str
    assistant: Assistant
    engine: GenerationEngine
    context_length: int


class ModelPool:
    """Loads every model of ``config`` (at construction) and finds them by name.

    Args:
        config: the server configuration.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.feature_cache = ImageFeatureCache(config.feature_cache_bytes)
        self.models: dict[str, ServedModel] = {}
        try:
            for spec in config.models:
                self.models[spec.name] = self._load(spec.name, spec.path, config)
        except BaseException:
            self.close()
            raise

    def _load(self, name: str, path: str, config: ServeConfig) -> ServedModel:
        assistant = load(
            path,
            device=config.device,
            template=config.template,
            system_prompt=config.system_prompt,
            feature_cache=self.feature_cache,
        )
        engine = GenerationEngine(
            assistant.model,
            assistant.tokenizer,
            assistant.stop_ids,
            assistant.template.stop_strings,
            assistant.prompts.pad_token_id,
            max_batch=config.max_batch,
            feature_cache=self.feature_cache,
            model_key=name,
        )
        return ServedModel(name, assistant, engine, assistant.context_length)

    def get(self, name: str) -> ServedModel:
        """The model called ``name``, or a 404 listing the served ones."""
        served = self.models.get(name)
        if served is None:
            raise APIError(
                404,
                f"the model {name!r} does not exist on this server; served models: {sorted(self.models)}",
                param="model",
                code="model_not_found",
            )
        return served

    def close(self) -> None:
        """Stop every engine."""
        for served in self.models.values():
            served.engine.close()
