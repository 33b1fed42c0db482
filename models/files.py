"""Writing files so that nothing is lost.

* Every write goes to a temporary file beside its destination (same folder, so same filesystem) and is renamed
  into place with :func:`os.replace`: a write that is killed or runs out of disk leaves the previous file whole.
  Temporary names look like ``.model.safetensors.hybridvl-tmp-1a2b3c4d``: hidden, and never matching the
  names loaders look for (``*.ckpt``, ``model*.safetensors``).
* An output folder is checked before anything is written (:func:`check_output`): it may not be one of the
  inputs, and it must be new or empty unless the caller passes ``overwrite=True``. On overwrite the weight
  files a new model does not write (a stale ``model.safetensors.index.json`` and its shards) are removed
  (:func:`remove_stale_weights`), so later loads cannot read old weights beside new ones.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger("hybridvl.files")

TMP_MARK = ".hybridvl-tmp-"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d+-of-\d+\.safetensors")
# written by a training stage into its export folder: the run that wrote the export and whether it completed
EXPORT_RECORD = "export_record.json"


class OutputError(ValueError):
    """An output that would replace something it was not asked to."""


class OutputIsInputError(OutputError):
    """The output folder is one of the inputs being read."""


class OutputExistsError(OutputError):
    """The output exists and holds files, and ``overwrite`` was not given."""


class WriteError(OSError):
    """A file could not be written (disk full, permissions...); the previous file at that path is unchanged.
    ``errno`` is the failure's; the message names the file."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _temporary_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``."""
    return path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` on a temporary path beside ``path``, flush it to disk and rename it to ``path``.

    Leftover temporary files of earlier, killed writes to ``path`` are removed first. If ``write`` fails the
    temporary file is removed and ``path`` is left as it was.

    Raises:
        WriteError: the write failed with an OS error (no space, no permission...); the message names ``path``.
    """
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}{TMP_MARK}*"):
            logger.info("removing %s, left by an interrupted write of %s", stale, path)
            stale.unlink()
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written there"
            reason = error.strerror or str(error)
            raise WriteError(error.errno, f"could not write {path}: {reason}; {kept}") from error
        raise
    _fsync_folder(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def write_json(path: str | Path, data: object) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def copy_file(source: str | Path, destination: str | Path) -> Path:
    """Copy ``source`` (contents and times) to ``destination`` atomically."""
    return atomic_write(destination, lambda temporary: shutil.copy2(source, temporary))


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames into it) to disk; some filesystems cannot, which is logged."""
    try:
        _fsync(folder)
    except OSError as error:
        logger.warning("could not flush the folder %s to disk: %s", folder, error)


def _same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (through links too, when both exist)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _folder_entries(folder: Path) -> list[str]:
    """The names in ``folder``, leaving out temporary files of interrupted writes."""
    return sorted(entry.name for entry in folder.iterdir() if TMP_MARK not in entry.name)


def check_output(
    out: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    what: str = "output",
    overwrite_hint: str = "pass --overwrite (overwrite=True)",
) -> None:
    """Refuse an output folder that is one of ``inputs``, that is a file, or that holds files (without
    ``overwrite``). Writes nothing. ``what`` names the output and ``overwrite_hint`` how to allow writing over
    files, in the messages.

    Raises:
        OutputIsInputError: ``out`` is one of ``inputs`` (``overwrite`` does not change this: the input would
            be destroyed while it is read).
        OutputExistsError: ``out`` is a file, or a folder with files in it and ``overwrite`` is false.
    """
    out = Path(out)
    for source in inputs:
        if source is not None and _same_path(out, source):
            raise OutputIsInputError(
                f"the {what} folder {out} is the input {source}: writing there would replace what is being read; "
                f"choose another {what} folder"
            )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"the {what} {out} is a file, not a folder; choose a new or empty folder")
    if overwrite or not out.is_dir():
        return
    entries = _folder_entries(out)
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OutputExistsError(
            f"the {what} folder {out} is not empty (it holds {shown}); choose a new or empty folder, or "
            f"{overwrite_hint} to write over its model files"
        )


def remove_stale_weights(folder: str | Path, keep: Iterable[str] = (WEIGHTS_NAME,)) -> list[str]:
    """Remove the weight files in ``folder`` that a new model writing ``keep`` would leave behind: the shard
    index, the shards it names, any ``model-NNNNN-of-NNNNN.safetensors`` and ``model.safetensors`` unless kept.
    The index goes first, so that no load reads old shards beside new weights. Returns the removed names (each
    also logged)."""
    folder, keep = Path(folder), set(keep)
    if not folder.is_dir():
        return []
    removed, names = [], []
    index = folder / INDEX_NAME
    if index.is_file() and INDEX_NAME not in keep:
        try:
            names = list(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            logger.warning("%s is not a valid shard index; only files named like shards are removed with it", index)
        index.unlink()
        removed.append(INDEX_NAME)
        logger.info("removed the stale shard index %s", index)
    names += [p.name for p in folder.iterdir() if SHARD_PATTERN.fullmatch(p.name) or p.name == WEIGHTS_NAME]
    for name in dict.fromkeys(names):
        path = folder / name
        if name in keep or Path(name).name != name or not path.is_file():
            continue
        path.unlink()
        removed.append(name)
        logger.info("removed the stale weight file %s", path)
    return removed


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A fresh temporary folder inside ``out`` to write files into (e.g. with a library's ``save_pretrained``);
    when the block ends without an error each file is renamed into ``out`` (``config.json`` last), otherwise the
    temporary folder is removed and ``out`` keeps what it had."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{TMP_MARK}{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        for entry in sorted(staging.iterdir(), key=lambda p: (p.name == "config.json", p.name)):
            if entry.is_file():
                _fsync(entry)
            os.replace(entry, out / entry.name)
        _fsync_folder(out)
    except OSError as error:
        if isinstance(error, WriteError):
            raise
        raise WriteError(error.errno, f"could not write into {out}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
