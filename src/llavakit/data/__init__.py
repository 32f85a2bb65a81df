"""Everything between a dataset on disk and a batch the model trains on.

Flow (one module per step)::

    formats / mixture   LLaVA .json / .jsonl / .yaml mixture  ->  Record (file:line)  ->  Sample (schema)
    templates           Sample.conversation  ->  [Segment(text, trainable)]           (registry TEMPLATES)
    tokenize            segments  ->  input_ids + labels, <image> expanded to exact visual-token counts
    prepare / images    header sizes -> token counts -> encode -> truncation policy    (no pixel decoding)
    dataset             scan with an explicit skip policy (issues), lazy pixels in __getitem__
    collate / packing   right-padded batches, or packed isolated rows (4-D masks / varlen position_ids)
    sampling            seeded, resumable length- and modality-grouped batch samplers
    inspect             the library behind ``llavakit data inspect``

Entry points for the trainer: `config.DataConfig`, `dataset.build_dataset`, `collate.build_collator`,
`sampling.GroupedBatchSampler`, `packing.PackedDataset` + `packing.PackingCollator`. For inference:
`templates.get_template` and `tokenize.SampleEncoder` (``for_generation=True``).
"""
