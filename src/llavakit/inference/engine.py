"""Continuous batching: one generation loop shared by every concurrent request, which joins it at any step.

`Assistant.generate` runs transformers' ``generate`` on a batch that is fixed from start to end: a request arriving
a moment later waits for the whole batch, and a short answer's row idles until the longest one ends. A server needs
better, so this module owns its decoding loop (written here, not taken from transformers, whose loop cannot take new
rows mid-flight; each step is still the transformers LLM's own forward with its KV cache):

    loop:  admit waiting requests ─► prefill them as one left-padded batch ─► merge their KV cache into the running one
           one decode step for every running row ─► each row: sample, stream its text, finish (stop / length / cancel)
           drop finished rows from the cache, trim columns no row needs

The running KV cache is one transformers ``DynamicCache`` of ``[B, H, M, d]`` tensors per layer, rows left-padded
to a common length ``M``; the attention mask marks each row's real positions and position ids are counted per row,
so a row's numbers do not depend on which other rows share its steps (up to floating-point summation order).

Sampling is per row: greedy rows take the argmax; sampled rows apply their temperature and top-p and draw from
their own ``torch.Generator`` (seeded from the request's ``seed``), so a seeded request gives the same answer
whatever else is running. Texts are released through `IncrementalDetokenizer`, so a streamed answer equals the
final one and `llavakit.inference.generate.decode`'s.

A failing prefill is retried request by request, so one bad request fails alone; a failing decode step fails the
rows of that step and the loop carries on. The loop runs in one background thread; `submit` may be called from any
thread, and events go to each request's own callback.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llavakit.errors import ConfigError
from llavakit.inference.detokenize import IncrementalDetokenizer
from llavakit.inference.feature_cache import ImageFeatureCache
from llavakit.inference.images import PreparedImage, encode_prepared
from llavakit.inference.videos import PreparedVideo, video_inputs
from llavakit.model.llava_next import LlavaNextModel

logger = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The engine's waiting queue is full."""


@dataclass(frozen=True)
class TextDelta:
    """New answer text of one request (``text`` may be empty when a token only extended held-back text)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """A request is done: ``reason`` is ``"stop"`` (stop token or string) or ``"length"`` (max tokens)."""

    reason: str
    completion_tokens: int
    text: str


@dataclass(frozen=True)
class Failed:
    """A request could not be completed (its error); other requests are unaffected."""

    error: BaseException


Event = TextDelta | Finished | Failed


@dataclass
class EngineRequest:
    """One answer to generate.

    Attributes:
        prompt_ids: the prompt's token ids, image placeholders expanded.
        images: its images in placeholder order.
        videos: its videos in placeholder order (frames; encoded at prefill).
        max_new_tokens: generated tokens at most (the stop token included).
        temperature: 0 = greedy; else the softmax temperature.
        top_p: nucleus mass in (0, 1] when sampling.
        seed: seed of this request's sampling generator (None: drawn at random).
        stop: stop strings besides the template's.
        stream: send `TextDelta` events as text is released (False: only the final `Finished`, which holds the
            whole text; saves a cross-thread wake-up per token).
        on_event: called (from the engine thread) with each `Event`; must not block.
    """

    prompt_ids: list[int]
    images: tuple[PreparedImage, ...]
    max_new_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = True
    videos: tuple[PreparedVideo, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request at the next step (e.g. its client went away)."""
        self.cancelled.set()


@dataclass
class _Row:
    request: EngineRequest
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    generated: int = 0


@dataclass(frozen=True)
class EngineStats:
    """What the loop has done: steps run, rows admitted, and the most rows ever decoded in one step."""

    steps: int
    admitted: int
    max_rows: int


class GenerationEngine:
    """The continuous-batching loop for one model.

    Args:
        model: the model (eval mode; its device is used).
        tokenizer: its tokenizer.
        stop_ids: token ids that end an answer.
        stop_strings: the template's stop strings.
        pad_id: the id written into padded positions.
        max_batch: rows decoded together at most; further requests wait.
        max_waiting: requests waiting to join at most; `submit` refuses more (`EngineBusy`).
        feature_cache: image-feature cache, shared with other users of the model.
        model_key: this model's key in ``feature_cache``.
    """

    def __init__(
        self,
        model: LlavaNextModel,
        tokenizer: object,
        stop_ids: Sequence[int],
        stop_strings: Sequence[str],
        pad_id: int,
        max_batch: int = 32,
        max_waiting: int = 1024,
        feature_cache: ImageFeatureCache | None = None,
        model_key: str = "",
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        _check_full_attention(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(token) for token in stop_ids)
        self.stop_strings = tuple(stop_strings)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.feature_cache = feature_cache
        self.model_key = model_key
        self.device = next(model.parameters()).device
        self._cache_arg = _cache_argument(model.llm)
        self._waiting: queue.Queue[EngineRequest | None] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._last = torch.zeros(0, dtype=torch.long)
        self._steps = self._admitted = self._max_rows = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llavakit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, request: EngineRequest) -> EngineRequest:
        """Queue ``request``; its events arrive on ``request.on_event``. Returns the request (to cancel it)."""
        if self._closed:
            raise RuntimeError("the generation engine is closed")
        if self._waiting.qsize() >= self.max_waiting:
            raise EngineBusy(f"{self.max_waiting} requests are already waiting for this model; retry later")
        self._waiting.put(request)
        return request

    def close(self) -> None:
        """Stop the loop after the current step; waiting and running requests fail."""
        self._closed = True
        self._waiting.put(None)
        self._thread.join(timeout=60)

    @property
    def running(self) -> int:
        """Rows being decoded now."""
        return len(self._rows)

    @property
    def stats(self) -> EngineStats:
        return EngineStats(self._steps, self._admitted, self._max_rows)

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            incoming = self._take_waiting(block=not self._rows)
            if incoming is None:
                self._fail_all(RuntimeError("the server is shutting down"), waiting_too=True)
                return
            if incoming:
                self._admit(incoming)
            if self._rows:
                self._step()

    def _take_waiting(self, block: bool) -> list[EngineRequest] | None:
        """Requests to admit now (at most the free rows); None when the engine is closing."""
        taken: list[EngineRequest] = []
        free = self.max_batch - len(self._rows)
        try:
            while len(taken) < free:
                item = self._waiting.get(block=block and not taken)
                if item is None:
                    return None
                if not item.cancelled.is_set():
                    taken.append(item)
        except queue.Empty:
            pass
        return taken

    def _admit(self, requests: list[EngineRequest]) -> None:
        try:
            self._prefill(requests)
        except Exception:  # retry alone: only the request that cannot be prefilled fails
            logger.exception("prefill of %d requests failed; retrying them one by one", len(requests))
            for request in requests:
                try:
                    self._prefill([request])
                except Exception as err:
                    _send(request, Failed(err))

    def _prefill(self, requests: list[EngineRequest]) -> None:
        width = max(len(request.prompt_ids) for request in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        images = [image for request in requests for image in request.images]
        features = encode_prepared(self.model, images, self.feature_cache, self.model_key) if images else None
        dtype = next(self.model.projector.parameters()).dtype
        videos = video_inputs([video for request in requests for video in request.videos], self.device, dtype)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.embed_inputs(ids, image_features=features, **videos)
        cache = DynamicCache()
        output = self.model.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        for request in requests:
            request.images = request.videos = ()  # their features are in the KV cache now; the pixels can go
        rows = [self._new_row(request) for request in requests]
        self._merge(rows, cache, mask)
        self._admitted += len(rows)
        self._emit(rows, output.logits[:, -1, :], first_row=len(self._rows) - len(rows))

    def _new_row(self, request: EngineRequest) -> _Row:
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed % 2**64)  # any integer seeds; torch takes 64 bits
        detokenizer = IncrementalDetokenizer(self.tokenizer, (*self.stop_strings, *request.stop))
        return _Row(request, detokenizer, generator)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled ``rows`` (their cache and ``[b, L]`` mask) to the running batch, left-padding both."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            merged = DynamicCache()
            for index, (old, new) in enumerate(zip(self._cache.layers, cache.layers)):
                keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
                values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
                merged.update(keys, values, index)
            self._cache = merged
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self._rows.extend(rows)
        self._last = torch.cat(
            [self._last.to(self.device), torch.full((len(rows),), self.pad_id, device=self.device)]
        )

    def _step(self) -> None:
        self._steps += 1
        self._max_rows = max(self._max_rows, len(self._rows))
        try:
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
            output = self.model.llm(
                input_ids=self._last[:, None],
                attention_mask=self._mask,
                position_ids=self._mask.sum(dim=1, keepdim=True) - 1,
                use_cache=True,
                **{self._cache_arg: self._cache},
            )
            self._emit(self._rows, output.logits[:, -1, :], first_row=0)
        except Exception as err:
            logger.exception("a decode step failed; failing its %d rows", len(self._rows))
            self._fail_all(err)

    def _emit(self, rows: list[_Row], logits: torch.Tensor, first_row: int) -> None:
        """Pick each row's next token from ``logits [b, V]``, stream it, then drop the rows that are done.

        A row whose token cannot be picked (e.g. non-finite logits under sampling) fails alone.
        """
        tokens = self._pick(rows, logits.float())
        done = []
        for offset, (row, token) in enumerate(zip(rows, tokens)):
            if isinstance(token, BaseException):
                _send(row.request, Failed(token))
                done.append(first_row + offset)
                continue
            self._last[first_row + offset] = token
            if self._advance(row, token):
                done.append(first_row + offset)
        done += [
            index
            for index, row in enumerate(self._rows)
            if row.request.cancelled.is_set() and index not in done
        ]
        if done:
            self._drop(sorted(done))

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> list[int | BaseException]:
        """Each row's token id, or the error that kept it from being drawn."""
        tokens: list[int | BaseException] = logits.argmax(dim=-1).tolist()
        for index, row in enumerate(rows):
            if row.generator is not None:
                try:
                    tokens[index] = _sample(
                        logits[index], row.request.temperature, row.request.top_p, row.generator
                    )
                except RuntimeError as err:  # torch.multinomial refuses non-finite or all-zero probabilities
                    tokens[index] = err
        return tokens

    def _advance(self, row: _Row, token: int) -> bool:
        """Account one token of ``row``; True when the row is finished (its events sent)."""
        request = row.request
        row.generated += 1
        if token in self.stop_ids:
            return self._finish(row, "stop")
        delta = row.detokenizer.add(token)
        if delta and request.stream:
            _send(request, TextDelta(delta))
        if row.detokenizer.stopped:
            return self._finish(row, "stop")
        if row.generated >= request.max_new_tokens:
            return self._finish(row, "length")
        return False

    def _finish(self, row: _Row, reason: str) -> bool:
        rest = row.detokenizer.finish()
        if rest and row.request.stream:
            _send(row.request, TextDelta(rest))
        _send(row.request, Finished(reason, row.generated, row.detokenizer.answer))
        return True

    def _drop(self, indices: list[int]) -> None:
        keep = [index for index in range(len(self._rows)) if index not in set(indices)]
        self._rows = [self._rows[index] for index in keep]
        if not keep:
            self._cache, self._mask, self._last = None, self._mask[:0, :0], self._last[:0]
            return
        selector = torch.tensor(keep, device=self.device)
        self._mask = self._mask.index_select(0, selector)
        self._last = self._last.index_select(0, selector)
        start = int((self._mask.sum(dim=0) > 0).nonzero()[0])  # columns left of this are padding in every row
        self._mask = self._mask[:, start:]
        trimmed = DynamicCache()
        for index, layer in enumerate(self._cache.layers):
            trimmed.update(
                layer.keys.index_select(0, selector)[:, :, start:],
                layer.values.index_select(0, selector)[:, :, start:],
                index,
            )
        self._cache = trimmed

    def _fail_all(self, error: BaseException, waiting_too: bool = False) -> None:
        """Fail the running rows (and, at shutdown, the waiting requests) with ``error``."""
        for row in self._rows:
            _send(row.request, Failed(error))
        self._rows = []
        self._cache, self._mask, self._last = None, self._mask[:0, :0], self._last[:0]
        while waiting_too:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _send(item, Failed(error))


def _send(request: EngineRequest, event: Event) -> None:
    """Deliver ``event``; a failing callback (e.g. its client's event loop is gone) must not stop the loop."""
    try:
        request.on_event(event)
    except Exception:
        logger.exception("delivering an event to a request's callback failed; cancelling that request")
        request.cancel()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, L]`` of a left-padded mask: 0 at each row's first real token (padding clamped to 0)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """``tensor`` zero-padded on the left of ``dim`` to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``logits [V]`` with temperature and nucleus (top-p) filtering, drawn with ``generator``."""
    # Shifted so the largest logit is 0: a tiny temperature then gives -inf elsewhere (one-hot), never inf - inf.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=0) - sorted_probs
        sorted_probs[before >= top_p] = 0  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cache_argument(llm: torch.nn.Module) -> str:
    """The LLM forward's KV-cache keyword: ``cache`` in recent transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _check_full_attention(model: LlavaNextModel) -> None:
    """Refuse LLMs with sliding-window or other non-growing cache layers: rows are merged by left-padding caches."""
    layers = DynamicCache(config=model.llm.config).layers
    special = sorted({type(layer).__name__ for layer in layers if getattr(layer, "is_sliding", False)})
    if special:
        raise ConfigError(
            f"continuous batching merges full-attention KV caches, but this LLM uses {', '.join(special)} layers "
            "(sliding-window attention); serve it with vLLM (see the README)"
        )
