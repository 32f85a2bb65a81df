"""Small synthetic images to ask about (the tiny ``checkpoint`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from llavakit.data.synth import SynthConfig, generate_synth


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Paths of synthetic images of the three canvas shapes (square, wide, tall)."""
    dataset = generate_synth(tmp_path_factory.mktemp("images"), SynthConfig(n_train=12, n_heldout=2, seed=1))
    paths = sorted((dataset.root / "images" / "train").glob("*.png"))
    by_shape = {}
    for path in paths:
        with Image.open(path) as image:
            by_shape.setdefault(image.size, str(path))
    return list(by_shape.values())
