"""llavakit: build, train, evaluate and serve LLaVA-NeXT-style multimodal models.

Public API (imported lazily so that ``import llavakit`` stays fast):

- `llavakit.load(path)`: a trained model ready to chat and generate.
- `llavakit.LlavaNextModel`: the composed model (vision encoder + projector + LLM).
- `llavakit.ImageSpec`: the image preprocessing spec saved in every checkpoint.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LlavaNextModel": ("llavakit.model.llava_next", "LlavaNextModel"),
    "ImageSpec": ("llavakit.anyres.spec", "ImageSpec"),
    "load": ("llavakit.inference.api", "load"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'llavakit' has no attribute {name!r}")


__all__ = ["ImageSpec", "LlavaNextModel", "__version__", "load"]
