"""The bridge from a stage's data section to `llavakit.data`: dataset, collator and modality lengths.

Why: the trainer only needs ``len``/``[index]``, a collate function and (for the modality-grouped order) signed
lengths; this module is the one place that knows how `llavakit.data` builds them from our typed config, with the
model's tokenizer and image spec so tokens and visual-token counts match the model exactly.

`train_data_factory` binds what a run adds: its seed (mixture sampling and packing follow it), its folder (the
dataset index lives in ``<run_dir>/.index`` unless ``data.index_dir`` says otherwise, and each stage's data counts
go to ``<run_dir>/<stage>/data_stats.json``) and the process's rank (the scan is shared by ranks).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

from llavakit.data.collate import build_collator
from llavakit.data.config import DataConfig
from llavakit.data.dataset import DatasetStats, build_dataset
from llavakit.data.packing import PackedDataset, PackingCollator, PaddingFreeCollator
from llavakit.distributed import DistContext
from llavakit.errors import ConfigError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import StageConfig, TrainConfig
from llavakit.training.trainer import DataFactory, TrainData

logger = logging.getLogger(__name__)

DATA_STATS = "data_stats.json"


def data_config(stage: StageConfig, model: LlavaNextModel, seed: int = 0) -> DataConfig:
    """The `DataConfig` of ``stage``: its data section, the stage template or else the model's (with the system
    prompt recorded for it); ``seed`` seeds mixture sampling."""
    section = stage.data
    template, system_prompt = section.chat_template(model.config.template, model.config.system_prompt)
    return DataConfig(
        data_path=section.path,
        image_folder=section.image_folder or "",
        video_folder=section.video_folder or "",
        template=template,
        upstream_quirks=section.upstream_quirks,
        system_prompt=system_prompt,
        model_max_length=section.max_length,
        truncation_policy=section.truncation_policy,
        skip_policy=section.skip_policy,
        max_skip_fraction=section.max_skip_fraction,
        packing=section.packing,
        max_tokens_per_pack=section.max_tokens_per_pack,
        group_by_modality_length=section.group_by_modality_length,
        group_by_length=section.group_by_length,
        cache_samples=section.cache_samples,
        seed=seed,
    )


def index_dir(stage: StageConfig, run_dir: str | Path | None) -> Path | None:
    """Where the stage's scan is stored: ``data.index_dir``, else ``<run_dir>/.index``; None: not stored."""
    if stage.data.index_dir:
        return Path(stage.data.index_dir)
    return Path(run_dir) / ".index" if run_dir is not None else None


def build_train_data(
    stage: StageConfig,
    model: LlavaNextModel,
    *,
    seed: int = 0,
    run_dir: str | Path | None = None,
    context: DistContext | None = None,
) -> TrainData:
    """Scan (or load the stored scan of) the stage's data with the model's tokenizer and image spec.

    With ``data.packing`` the items are packed rows of up to ``data.max_tokens_per_pack`` (else ``data.max_length``)
    tokens (planned once, with ``seed``; the trainer reshuffles their order every epoch), and batch sizes count rows,
    not samples. With ``data.padding_free`` the items stay samples and each micro-batch is collated into one row.
    The scan's counts (truncated, downscaled, dropped, skipped by kind) are logged and, with a ``run_dir``, written to
    ``<run_dir>/<stage>/data_stats.json`` by rank 0.

    Args:
        stage: the stage config.
        model: its tokenizer, image spec and video spec (None: no video samples allowed) are used.
        seed: the run's seed (mixture sampling, packing).
        run_dir: the run folder (index and data stats); None keeps both off unless ``data.index_dir`` is set.
        context: this process's rank; None: one process.

    Raises:
        ConfigError: the model has no tokenizer.
    """
    if model.tokenizer is None:
        raise ConfigError(
            "the model has no tokenizer; export it with its tokenizer (save_pretrained) and retry"
        )
    config = data_config(stage, model, seed)
    dataset = build_dataset(
        config,
        model.tokenizer,
        model.config.image_spec,
        index_dir=index_dir(stage, run_dir),
        context=context,
        video_spec=model.config.video_spec,
    )
    if context is None or context.is_main:
        report_stats(stage, dataset.stats, run_dir)
    collator = build_collator(model.tokenizer)
    if not (stage.data.packing or stage.data.padding_free):
        return TrainData(dataset, collator, dataset.modality_lengths)
    rows = PackingCollator(collator.pad_token_id, attn_implementation=model.llm.config._attn_implementation)
    if stage.data.padding_free:
        return TrainData(dataset, PaddingFreeCollator(rows), dataset.modality_lengths)
    return TrainData(PackedDataset(dataset, budget=config.pack_budget, seed=seed), rows, None)


def report_stats(stage: StageConfig, stats: DatasetStats, run_dir: str | Path | None) -> None:
    """Log the scan's counts (a warning when samples were lost or cut) and save them with the stage's metrics."""
    lost = stats.num_truncated + stats.num_downscaled + stats.num_dropped_too_long + stats.issues.total
    log = logger.warning if lost else logger.info
    log("stage %s data (%s): %s", stage.name, stage.data.path, stats.summary())
    if run_dir is not None:
        folder = Path(run_dir) / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DATA_STATS).write_text(
            json.dumps({"data_path": stage.data.path, **stats.to_dict()}, indent=1)
        )


def train_data_factory(config: TrainConfig, context: DistContext) -> DataFactory:
    """`build_train_data` bound to the run's seed, folder and this process's rank (what `train` passes on)."""
    return partial(build_train_data, seed=config.seed, run_dir=config.run_dir, context=context)
