"""Plug-ins that let other tools run llavakit models.

- ``lmms_eval_manifest``: registers the ``llavakit`` model with lmms-eval (Python entry-point group
  ``lmms_eval.models`` in pyproject.toml), so ``lmms-eval --model llavakit --model_args pretrained=DIR --tasks
  mme`` runs a llavakit checkpoint through lmms-eval's own CLI and task definitions. The model class lives in
  `llavakit.integrations.lmms_eval`, imported by lmms-eval only when the model is requested.

Nothing here is imported by ``import llavakit``, and this module imports lmms-eval only inside the function
that lmms-eval itself calls, so llavakit never needs lmms-eval installed.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "llavakit"
MODEL_CLASS = "llavakit.integrations.lmms_eval.LlavaKit"


def lmms_eval_manifest() -> Any:
    """lmms-eval's ``ModelManifest`` for the ``llavakit`` model (called by lmms-eval's model registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
