"""The bridge from a stage's data section to `llavakit.data`: dataset, collator and modality lengths.

Why: the trainer only needs ``len``/``[index]``, a collate function and (for the modality-grouped order) signed
lengths; this module is the one place that knows how `llavakit.data` builds them from our typed config, with the
model's tokenizer and image spec so tokens and visual-token counts match the model exactly.
"""

from __future__ import annotations

from llavakit.data.collate import build_collator
from llavakit.data.config import DataConfig
from llavakit.data.dataset import build_dataset
from llavakit.data.packing import PackedDataset, PackingCollator, PaddingFreeCollator
from llavakit.errors import ConfigError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import StageConfig
from llavakit.training.trainer import TrainData


def data_config(stage: StageConfig, model: LlavaNextModel, seed: int = 0) -> DataConfig:
    """The `DataConfig` of ``stage``: its data section, the stage template or else the model's (with the system
    prompt recorded for it)."""
    section = stage.data
    template, system_prompt = section.chat_template(model.config.template, model.config.system_prompt)
    return DataConfig(
        data_path=section.path,
        image_folder=section.image_folder or "",
        template=template,
        system_prompt=system_prompt,
        model_max_length=section.max_length,
        packing=section.packing,
        group_by_modality_length=section.group_by_modality_length,
        group_by_length=section.group_by_length,
        cache_samples=section.cache_samples,
        seed=seed,
    )


def build_train_data(stage: StageConfig, model: LlavaNextModel) -> TrainData:
    """Scan the stage's data with the model's tokenizer and image spec.

    With ``data.packing`` the items are packed rows of up to ``data.max_length`` tokens (planned once, with the
    run seed; the trainer reshuffles their order every epoch), and batch sizes count rows, not samples. With
    ``data.padding_free`` the items stay samples and each micro-batch is collated into one row.

    Raises:
        ConfigError: the model has no tokenizer.
    """
    if model.tokenizer is None:
        raise ConfigError(
            "the model has no tokenizer; export it with its tokenizer (save_pretrained) and retry"
        )
    dataset = build_dataset(data_config(stage, model), model.tokenizer, model.config.image_spec)
    collator = build_collator(model.tokenizer)
    if not (stage.data.packing or stage.data.padding_free):
        return TrainData(dataset, collator, dataset.modality_lengths)
    rows = PackingCollator(collator.pad_token_id, attn_implementation=model.llm.config._attn_implementation)
    if stage.data.padding_free:
        return TrainData(dataset, PaddingFreeCollator(rows), dataset.modality_lengths)
    return TrainData(PackedDataset(dataset, budget=stage.data.max_length), rows, None)
