"""LLaVA / ShareGPT-style conversation datasets read from JSON or JSONL files.

A file holds records, either as one JSON array or as JSON Lines (one record per line; blank lines are ignored).
A record looks like::

    {"id": "42",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}],
     "image": "cats/a.jpg",
     "task": "captioning"}

* The turns are under ``"conversations"`` (LLaVA: ``"from"`` / ``"value"``) or ``"messages"`` (ShareGPT:
  ``"role"`` / ``"content"`` strings). Roles ``human`` / ``user``, ``gpt`` / ``assistant`` and ``system`` are
  understood (in any letter case); a system turn may only come first, the first other turn must be the user's and
  the last turn the assistant's.
* Media are listed under ``"image"`` (one path or a list), ``"images"``, ``"video"`` or ``"videos"`` (``null``
  means none; giving both the singular and the plural key is ambiguous and rejected). Paths are relative to the
  dataset's ``media_root`` (absolute paths are used as they are).
* ``<image>`` and ``<video>`` placeholders in user or system turns mark where each listed file goes, in order; their
  counts must equal the numbers of files. Newlines right next to a placeholder (LLaVA's ``"<image>\\n"``) and the
  whitespace around each turn's text are dropped.
* ``"task"`` (optional) names the task for metrics; it defaults to ``"conversation"``.

A JSON array file is loaded into memory; a JSONL file is only indexed (the byte offset of each good record), and
each record is read again when it is needed. Either way media are decoded lazily, in ``__getitem__``.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from hybridvl.lit.data.types import Conversation
from hybridvl.vision import VisionInputError, load_image, probe_video, read_video

__all__ = ["ConversationDataset", "DataError"]

logger = logging.getLogger("hybridvl.data")

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_MEDIA_KEYS = {"image": ("image", "images"), "video": ("video", "videos")}
_PLACEHOLDER = re.compile(r"\n*(<image>|<video>)\n*")


class DataError(ValueError):
    """A bad training record or sample; the message names the file and record (and the media file, if any)."""


class _RecordError(Exception):
    """A record's problem, before the file and record index are added (internal)."""


def _media_paths(record: dict, kind: str, media_root: Path) -> list[Path]:
    singular, plural = _MEDIA_KEYS[kind]
    given = [key for key in (singular, plural) if record.get(key) is not None]
    if len(given) == 2:
        raise _RecordError(f"has both {singular!r} and {plural!r}")
    if not given:
        return []
    value = record[given[0]]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise _RecordError(f"{given[0]!r} must be a file name or a list of file names, got {value!r}")
    return [media_root / name for name in names]


def _turns(record: dict) -> list[tuple[str, str]]:
    """The ``(role, text)`` turns of ``record``, roles normalised to ``system`` / ``user`` / ``assistant``."""
    key = "conversations" if "conversations" in record else "messages"
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise _RecordError("has no 'conversations' (or 'messages') list of turns")
    parsed = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RecordError(f"turn {number} is not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise _RecordError(f"turn {number} has unknown role {role!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(text, str):
            raise _RecordError(f"turn {number} has no text ('value' or 'content' string)")
        role = _ROLES[role.lower()]
        if role == "system" and number > 0:
            raise _RecordError(f"turn {number} is a system turn; only the first turn may be")
        parsed.append((role, text))
    opening = 1 if parsed[0][0] == "system" else 0
    if opening < len(parsed) and parsed[opening][0] != "user":
        raise _RecordError(f"turn {opening} is the assistant's; a conversation opens with a user turn")
    if parsed[-1][0] != "assistant":
        raise _RecordError("the last turn is not the assistant's")
    return parsed


def _parse_record(record: Any, media_root: Path) -> tuple[list[dict], str, str]:
    """Validate ``record`` and build its messages; media items hold ``"path"`` instead of decoded media.

    Returns:
        The messages, the task and the last assistant reply.

    Raises:
        _RecordError: what is wrong with the record.
    """
    if not isinstance(record, dict):
        raise _RecordError(f"is not a JSON object but {type(record).__name__}")
    turns = _turns(record)
    paths = {kind: _media_paths(record, kind, media_root) for kind in _MEDIA_KEYS}
    pieces = [(role, _PLACEHOLDER.split(text.strip())) for role, text in turns]
    for kind, listed in paths.items():
        placeholders = sum(split[1::2].count(f"<{kind}>") for _, split in pieces)
        if placeholders != len(listed):
            raise _RecordError(f"has {placeholders} <{kind}> placeholder(s) but lists {len(listed)} {kind} file(s)")
    remaining = {kind: iter(listed) for kind, listed in paths.items()}
    messages = []
    for number, (role, split) in enumerate(pieces):
        content = [{"type": "text", "text": text} for text in split[:1] if text]
        for placeholder, text in zip(split[1::2], split[2::2]):
            if role == "assistant":
                raise _RecordError(f"turn {number} is the assistant's but holds a {placeholder} placeholder")
            kind = placeholder[1:-1]
            content.append({"type": kind, "path": next(remaining[kind])})
            if text:
                content.append({"type": "text", "text": text})
        if not content:
            raise _RecordError(f"turn {number} is empty")
        messages.append({"role": role, "content": content})
    task = record.get("task", "conversation")
    if not isinstance(task, str) or not task:
        raise _RecordError(f"'task' must be a non-empty string, got {task!r}")
    return messages, task, turns[-1][1].strip()


def _read_header(item: dict, video_fps: float, max_video_frames: int | None) -> dict:
    """The size of an image, or the sampled shape of a video, from the file's header (no pixels decoded)."""
    path = item["path"]
    if item["type"] == "image":
        if not path.is_file():
            raise VisionInputError(path, "no such file")
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise VisionInputError(path, f"not a readable image: {error}") from error
        return {"type": "image", "image_size": (height, width)}
    info = probe_video(path)
    # read_video's nearest-frame rule samples k / fps for every k with k / fps < num_frames / video rate
    rate = Fraction(info.fps).limit_denominator(1_000_000)
    frames = math.ceil(info.num_frames * Fraction(video_fps).limit_denominator(1_000_000) / rate)
    if max_video_frames is not None:
        frames = min(frames, max_video_frames)
    return {"type": "video", "video_shape": (frames, info.height, info.width), "fps": video_fps}


class ConversationDataset(Dataset[Conversation]):
    """The conversations of one LLaVA / ShareGPT JSON or JSONL file (format in the module docstring).

    The file is read and every record validated at construction (media files are not opened then); media are
    decoded in :meth:`__getitem__`: images with :func:`hybridvl.vision.load_image`, videos with
    :func:`hybridvl.vision.read_video` sampled at ``video_fps``.

    Bad data raises :class:`DataError` naming the file and the record index (0-based, counting every record
    including bad ones; JSONL messages add the line number): a file that is not valid JSON / JSONL, a record that
    breaks the format, a missing or unreadable image or video (named too). With ``on_error="skip"`` a bad record
    is logged as a warning on the ``"hybridvl.data"`` logger and counted in :attr:`num_skipped` instead:

    * records found bad at construction are left out of the dataset (only a file that cannot be parsed at all,
      or one with no good record, still raises);
    * a record whose media turn out bad when an item is loaded is replaced by the next good record (wrapping
      around), deterministically; it is remembered and skipped from then on. Each process (each ``DataLoader``
      worker) keeps its own record of these and its own count.

    Args:
        path: the file: read as JSON Lines if it is named ``.jsonl`` or ``.ndjson`` or does not start with
            ``[``, as a JSON array of records otherwise.
        media_root: the directory media paths are relative to.
        video_fps: frames per second to sample videos at.
        max_video_frames: keep at most this many sampled frames of each video (the earliest); all when ``None``.
        on_error: ``"raise"`` or ``"skip"`` (see above).

    Attributes:
        path, media_root, video_fps, max_video_frames, on_error: as given.
    """

    def __init__(
        self,
        path: str | Path,
        media_root: str | Path,
        video_fps: float = 2.0,
        max_video_frames: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        if not 0 < video_fps < math.inf:
            raise ValueError(f"video_fps must be a positive finite number, got {video_fps}")
        if max_video_frames is not None and max_video_frames < 1:
            raise ValueError(f"max_video_frames must be at least 1 or None, got {max_video_frames}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = Path(path)
        self.media_root = Path(media_root)
        self.video_fps = video_fps
        self.max_video_frames = max_video_frames
        self.on_error = on_error
        self._num_skipped = 0
        self._bad: set[int] = set()  # positions whose media turned out bad
        self._records: list[dict] | None = None  # JSON arrays: the good records
        self._offsets: np.ndarray | None = None  # JSONL: byte offset of each good record's line
        self._lines: np.ndarray | None = None  # JSONL: its line number (1-based)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        record_indices = self._index_jsonl() if self._is_jsonl() else self._index_json()
        self._record_indices = np.asarray(record_indices, dtype=np.int64)
        if not len(self._record_indices):
            raise DataError(f"{self.path}: no usable records ({self._num_skipped} bad record(s) skipped)")
        if self._num_skipped:
            logger.warning(
                "%s: skipped %d bad record(s), kept %d", self.path, self._num_skipped, len(self._record_indices)
            )

    @property
    def num_skipped(self) -> int:
        """How many bad records were skipped: at construction and, in this process, when loading items."""
        return self._num_skipped

    def __len__(self) -> int:
        return len(self._record_indices)

    def __getitem__(self, index: int) -> Conversation:
        """The conversation at ``index`` with its media decoded (see the class docstring for bad records)."""
        return self._resolve(index, self._decode)

    def outline(self, index: int) -> Conversation:
        """The conversation at ``index`` with media described by their file headers instead of decoded.

        Image items are ``{"type": "image", "image_size": (height, width)}``, video items ``{"type": "video",
        "video_shape": (frames, height, width), "fps": video_fps}`` where ``frames`` is the number
        :meth:`__getitem__` samples (exact for constant-frame-rate videos). Use it with
        :func:`hybridvl.lit.data.encoding.count_tokens` to get lengths without decoding pixels. The conversation's
        ``images`` and ``videos`` properties do not apply. Bad records are handled as in :meth:`__getitem__`, but
        only media whose headers are unreadable are found bad here.
        """
        return self._resolve(index, lambda item: _read_header(item, self.video_fps, self.max_video_frames))

    def _is_jsonl(self) -> bool:
        if self.path.suffix.lower() in (".jsonl", ".ndjson"):
            return True
        with self.path.open("rb") as file:
            start = file.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        return not start.startswith(b"[")

    def _where(self, record_index: int, line: int | None = None, record: Any = None) -> str:
        where = f"{self.path} record {record_index}"
        if line is not None:
            where += f" (line {line})"
        if isinstance(record, dict) and "id" in record:
            where += f" (id {record['id']!r})"
        return where

    def _reject(self, message: str) -> None:
        """Raise ``DataError(message)``, or in skip mode count and log it."""
        if self.on_error == "raise":
            raise DataError(message)
        self._num_skipped += 1
        logger.warning("skipping bad record (%d skipped so far): %s", self._num_skipped, message)

    def _check(self, record: Any, record_index: int, line: int | None = None) -> bool:
        """Whether ``record`` is well-formed; a bad one is rejected (raised, or counted and logged)."""
        try:
            _parse_record(record, self.media_root)
        except _RecordError as problem:
            self._reject(f"{self._where(record_index, line, record)}: {problem}")
            return False
        return True

    def _index_json(self) -> list[int]:
        try:
            records = json.loads(self.path.read_bytes())
        except json.JSONDecodeError as error:
            raise DataError(
                f"{self.path}: not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
            ) from error
        except UnicodeDecodeError as error:
            raise DataError(f"{self.path}: not valid JSON: not UTF-8 text ({error})") from error
        kept = [index for index, record in enumerate(records) if self._check(record, index)]
        self._records = [records[index] for index in kept]
        return kept

    def _index_jsonl(self) -> list[int]:
        kept, offsets, lines = [], [], []
        for record_index, (offset, line, text) in enumerate(_jsonl_lines(self.path)):
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                self._reject(f"{self._where(record_index, line)}: not valid JSON: {error}")
                continue
            if self._check(record, record_index, line):
                kept.append(record_index)
                offsets.append(offset)
                lines.append(line)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        return kept

    def _raw_record(self, position: int) -> tuple[Any, str]:
        """The record at ``position`` as parsed from the file, and where it is."""
        record_index = int(self._record_indices[position])
        if self._records is not None:
            record = self._records[position]
            return record, self._where(record_index, None, record)
        line = int(self._lines[position])
        with self.path.open("rb") as file:
            file.seek(int(self._offsets[position]))
            text = file.readline()
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{self._where(record_index, line)}: not valid JSON (file changed?): {error}") from error
        return record, self._where(record_index, line, record)

    def _conversation(self, position: int, load_media: Callable[[dict], dict]) -> Conversation:
        record, where = self._raw_record(position)
        try:
            messages, task, answer = _parse_record(record, self.media_root)
        except _RecordError as problem:
            raise DataError(f"{where}: {problem}") from None
        for message in messages:
            try:
                message["content"] = [
                    item if item["type"] == "text" else load_media(item) for item in message["content"]
                ]
            except VisionInputError as error:
                raise DataError(f"{where}: {error}") from error
        source = f"{self.path.name}:{self._record_indices[position]}"
        return Conversation(messages=messages, task=task, answer=answer, source=source)

    def _resolve(self, index: int, load_media: Callable[[dict], dict]) -> Conversation:
        """The conversation at ``index``, or in skip mode the next good one if its media are bad."""
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for {size} conversations")
        position = index % size
        for _ in range(size):
            if position not in self._bad:
                try:
                    return self._conversation(position, load_media)
                except DataError as error:
                    if self.on_error == "raise":
                        raise
                    self._bad.add(position)
                    self._reject(f"{error}; using the next good record instead")
            position = (position + 1) % size
        raise DataError(f"{self.path}: every record is bad ({self._num_skipped} skipped)")

    def _decode(self, item: dict) -> dict:
        if item["type"] == "image":
            return {"type": "image", "image": load_image(item["path"])}
        frames, _ = read_video(item["path"], fps=self.video_fps, max_frames=self.max_video_frames)
        return {"type": "video", "video": frames, "fps": self.video_fps}


def _jsonl_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(byte offset, line number, line)`` of each non-blank line of ``path``."""
    offset = 0
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield offset, number, line
            offset += len(line)
