"""Error types raised by llavakit.

Every error says what was wrong, where (file, line, field, sample id) and what to do. Catch `LlavakitError` to
handle all of them; the CLI prints them without a traceback.
"""

from __future__ import annotations


class LlavakitError(Exception):
    """Base class of all llavakit errors."""


class ConfigError(LlavakitError, ValueError):
    """A configuration value, id, flag or recipe is invalid."""


class ImageError(LlavakitError, ValueError):
    """An image file is missing, unreadable, corrupt, or has an unusable size."""


class VideoError(ImageError):
    """A video file or frame folder is missing, unreadable, corrupt, truncated or has no frames.

    A subclass of `ImageError`, so code that already skips or reports unusable images handles videos too.
    """


class DataError(LlavakitError, ValueError):
    """A dataset file or sample is malformed (JSON errors, bad turns, placeholder/image count mismatch, ...)."""


class CheckpointError(LlavakitError, ValueError):
    """A checkpoint folder is missing files, has mismatched shapes, or was written by an incompatible tool."""


class TrainingError(LlavakitError, RuntimeError):
    """Training cannot go on, e.g. the gradients stopped being finite (the update is not applied)."""
