"""`DataConfig`: every data-layer choice of a training run, in one typed value.

The trainer builds it from its own config section and passes it to `llavakit.data.dataset.build_dataset`,
`llavakit.data.collate.build_collator` and the samplers. Every field has the upstream-compatible default except the
two that upstream gets silently wrong: bad samples raise (``skip_policy="error"``) and mixtures are seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from llavakit.data.issues import POLICIES
from llavakit.errors import ConfigError

TRUNCATION_POLICIES = ("drop", "downscale")


@dataclass(frozen=True)
class DataConfig:
    """Data settings.

    Attributes:
        data_path: LLaVA ``.json`` / ``.jsonl`` file or ``.yaml`` mixture.
        image_folder: folder that relative ``image`` paths are resolved against.
        video_folder: folder that relative ``video`` paths are resolved against (upstream ``--video_folder``);
            empty: ``image_folder``.
        template: chat template id (`llavakit.data.templates.TEMPLATES`), saved in the checkpoint.
        upstream_quirks: reproduce upstream training masks of the template (see its module); False fixes them.
        system_prompt: replaces the template's default system prompt (samples' own system turns still win);
            None keeps the default. Saved in the checkpoint with the template id.
        model_max_length: token cap per sample after image expansion.
        truncation_policy: a sample whose cut would go through an image's tokens is ``drop``-ped, or its images are
            ``downscale``-d to a single tile (last image first) until it fits; counted either way.
        skip_policy: ``error`` (raise on the first bad sample) | ``skip`` (count, report, continue).
        max_skip_fraction: with ``skip``, fail when more than this fraction of samples is bad.
        packing: pack samples into rows of ``max_tokens_per_pack`` tokens (see `llavakit.data.packing`).
        max_tokens_per_pack: token budget of one packed row; 0 means ``model_max_length``.
        group_by_modality_length: single-modality, length-grouped global batches (upstream sampler).
        group_by_length: length-grouped batches regardless of modality.
        cache_samples: build each sample (tokens and pixels) once and keep it in memory (see
            `llavakit.data.dataset`); for small datasets only: it holds every sample's pixels.
        seed: seed of mixture sampling and of the samplers.
    """

    data_path: str
    image_folder: str = ""
    video_folder: str = ""
    template: str = "vicuna_v1"
    upstream_quirks: bool = True
    system_prompt: str | None = None
    model_max_length: int = 4096
    truncation_policy: str = "drop"
    skip_policy: str = "error"
    max_skip_fraction: float = 0.01
    packing: bool = False
    max_tokens_per_pack: int = 0
    group_by_modality_length: bool = False
    group_by_length: bool = False
    cache_samples: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_max_length <= 0:
            raise ConfigError(f"data.model_max_length must be positive, got {self.model_max_length}")
        if self.truncation_policy not in TRUNCATION_POLICIES:
            raise ConfigError(
                f"data.truncation_policy {self.truncation_policy!r} must be one of {TRUNCATION_POLICIES}"
            )
        if self.skip_policy not in POLICIES:
            raise ConfigError(f"data.skip_policy {self.skip_policy!r} must be one of {POLICIES}")
        if self.max_tokens_per_pack < 0:
            raise ConfigError("data.max_tokens_per_pack must be >= 0 (0 = model_max_length)")
        if self.group_by_length and self.group_by_modality_length:
            raise ConfigError("choose one of data.group_by_length and data.group_by_modality_length")

    @property
    def video_root(self) -> str:
        """Where relative video paths resolve: ``video_folder``, else ``image_folder``."""
        return self.video_folder or self.image_folder

    @property
    def pack_budget(self) -> int:
        """Tokens per packed row."""
        return self.max_tokens_per_pack or self.model_max_length
