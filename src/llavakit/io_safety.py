"""Writing checkpoint and dataset folders without destroying anything.

Every llavakit writer of a folder (`llavakit.model.checkpoint.save_checkpoint`,
`llavakit.conversion.original.export_original`, `llavakit.data.synth.generate_synth`) goes through `write_folder`:

1. `check_separate` refuses an output equal to its input, inside it, or holding it: writing there would overwrite
   the input in place (``convert to-original SRC SRC`` once lost the template and system prompt for good).
2. Everything is written into ``<out>.partial-<pid>`` next to the output and fsynced. An error or crash while
   writing (the long part: gigabytes of weights, thousands of images) leaves the output as it was; the partial
   folder of a killed process stays behind, visibly named, for the user to delete.
3. Commit. A missing or empty output folder: the partial folder is renamed to it, one atomic step. An existing one:
   each written file replaces its namesake with one atomic ``os.replace``, then the files the writer owned there and
   did not write again are deleted, then the ``last`` files (a manifest) are moved in, so that a folder whose
   manifest is new holds the new files. Entries the writer does not own are left alone: a checkpoint folder keeps a
   user's notes or an ``adapter/`` folder, a dataset folder the user's own files.

Why our own: the standard library has no "replace a folder" step, and replacing the whole folder (rename it away,
rename the new one in) would have to move the user's files along or delete them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

from llavakit.errors import LlavakitError

PARTIAL_INFIX = ".partial-"


def check_separate(
    out: str | Path, sources: Iterable[str | Path], error: type[LlavakitError], what: str
) -> None:
    """Refuse an output folder that is, lies inside, or contains one of the inputs it is written from.

    Args:
        out: the output folder.
        sources: the inputs; entries that are not existing paths (hub ids) are skipped.
        error: the llavakit error type to raise.
        what: the command or function, named in the message.
    """
    target = Path(out).resolve()
    for source in sources:
        if not Path(source).exists():
            continue
        resolved = Path(source).resolve()
        if target == resolved:
            relation = "is the input"
        elif resolved in target.parents:
            relation = "lies inside the input"
        elif target in resolved.parents:
            relation = "contains the input"
        else:
            continue
        raise error(
            f"{what}: the output {out} {relation} {source}; writing there would overwrite the input in place. "
            "Choose an output folder outside the input"
        )


def write_folder(
    out: str | Path,
    write: Callable[[Path], None],
    error: type[LlavakitError],
    owned: Callable[[Path], Collection[str]] = lambda _: (),
    replace_others: bool = True,
    last: Sequence[str] = (),
) -> Path:
    """Write a folder through ``write(partial_folder)`` and commit it to ``out`` (see the module docstring).

    Args:
        out: the output folder (created with its parents if missing).
        write: fills the folder it is given; anything it raises propagates after the partial folder is removed.
        error: the llavakit error type for refusals.
        owned: the files (paths relative to ``out``, ``/``-separated) in an existing ``out`` that this writer
            wrote earlier; those it does not write again are deleted.
        replace_others: whether a written file may replace a file of ``out`` that ``owned`` does not list
            (checkpoints: yes, their file names are the writer's; datasets: no, the write is refused).
        last: files committed after all others and after the deletions (a manifest that marks the folder done).

    Returns:
        ``out`` as a `Path`.

    Raises:
        ``error``: ``out`` is a file, or (``replace_others=False``) a written file would replace one it does not own.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{out} is a file, not a folder; choose a folder path for the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}{PARTIAL_INFIX}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # this process's own leftover
    partial.mkdir()
    try:
        write(partial)
        written = _files(partial)
        for relative in written:
            _fsync(partial / relative)
        if out.is_dir() and any(out.iterdir()):
            _commit_into(partial, out, written, error, set(owned(out)), replace_others, last)
        else:
            if out.is_dir():
                out.rmdir()
            partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _fsync_folder(out)
    return out


def _commit_into(
    partial: Path,
    out: Path,
    written: list[str],
    error: type[LlavakitError],
    owned: set[str],
    replace_others: bool,
    last: Sequence[str],
) -> None:
    if not replace_others:
        foreign = [relative for relative in written if relative not in owned and (out / relative).exists()]
        if foreign:
            raise error(
                f"{out} holds files this writer did not write, at paths it would write: "
                f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; move them away or choose another "
                "output folder (nothing was changed)"
            )
    final = [relative for relative in written if relative in last]
    for relative in [relative for relative in written if relative not in last]:
        _move(partial, out, relative)
    new = set(written)
    for relative in sorted(owned - new):
        (out / relative).unlink(missing_ok=True)
        _remove_empty_parents(out / relative, out)
    for relative in final:
        _move(partial, out, relative)


def _files(folder: Path) -> list[str]:
    """Relative paths of the files under ``folder``, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _move(partial: Path, out: Path, relative: str) -> None:
    target = out / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial / relative, target)


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Remove the folders between ``path`` and ``root`` that deleting ``path`` left empty."""
    for parent in path.parents:
        if parent == root or root not in parent.parents or not parent.is_dir() or any(parent.iterdir()):
            return
        parent.rmdir()


def _fsync(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` and its parent durable (a no-op where folders cannot be opened)."""
    for path in (folder, folder.parent):
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
