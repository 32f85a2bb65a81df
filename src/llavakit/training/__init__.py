"""Training: typed run configs and recipes → a staged, resumable, distributed training loop.

Entry points: `llavakit.training.trainer.train` (all stages of a `TrainConfig`, returns a `TrainResult`),
`llavakit.training.recipes.load_recipe` / `resolve_config` (shipped YAML recipes, config files, overrides) and
`llavakit.training.upstream_flags.config_from_upstream_flags` (upstream ``train_mem.py`` command lines).

Layout (one concept per module): ``config`` / ``config_loading`` (what a run is, how it is read), ``recipes``,
``upstream_flags``, ``model_setup`` (preflight checks, where a stage's model comes from), ``stages`` (trainable
parts → ``requires_grad``), ``optim`` (parameter groups, schedule), ``batches`` (resumable sample order), ``data``
(bridge to `llavakit.data`), ``strategies/`` (single, DDP, FSDP2 over `llavakit.distributed`; applied from
outside the model),
``checkpoint`` (DCP, atomic, rotation), ``export`` (llava-hf folder + ``mm_projector.bin``), ``lora``, ``metrics``,
``trainer``. Submodules are imported on use so ``import llavakit.training`` stays cheap.
"""
