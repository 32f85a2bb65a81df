"""AnyRes high-resolution tiling in three layers of pure functions.

- `geometry`: pinpoints, best-resolution choice, grid shape, exact visual-token counts (no pixels, no torch).
- `pixels`: image loading, letterbox resize + pad, row-major tiles plus the base view.
- `features`: stitch tile features, unpad, image newline, ``anyres_max_N`` downsampling.

`spec.ImageSpec` is the one value that configures all three.
"""
