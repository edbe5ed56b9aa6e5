"""Streaming readers for Pile-format shards, prompt-completion shards and plain-text documents.

A Pile shard is JSON Lines, optionally gzip- or zstd-compressed: one object per line, the document under
"text" and its component under meta.pile_set_name, e.g.
``{"text": "...", "meta": {"pile_set_name": "Github"}}``. A prompt-completion shard is the same but for its
text, two keys: ``{"prompt": "Q: 2 + 3 =", "completion": " 5", "meta": {...}}`` (`iter_prompt_completions`).

Everything here streams: a shard is decompressed and parsed one line at a time, never held in memory whole.
Rows that cannot be used are skipped, not fatal; pass a `collections.Counter` as `bad` to learn how many were
skipped and why (keys are the reasons in `BAD_ROW_REASONS`). Rows that are kept but lack their component
(no `meta`, or no string `meta.pile_set_name`) come back with pile_set_name None; pass a Counter as `labelled`
to count them (key "missing_meta").

Paths may be local or URIs (`s3://...`, `gs://...`): see `neoxray.pipelines.fs`.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs as _fs

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
"""Pile shards: JSON Lines, plain, gzip or zstd."""
TEXT_SUFFIXES = (".txt",)
"""Plain-text files: the whole file is one document."""
DOCUMENT_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES

BAD_ROW_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_text", "text_not_string", "empty_text")
"""Why a row was skipped: the keys a `bad` counter may receive."""
PROMPT_COMPLETION_BAD_ROW_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_prompt",
    "missing_completion",
    "prompt_not_string",
    "completion_not_string",
    "empty_completion",
)
"""Why a prompt-completion row was skipped (an empty prompt is allowed)."""
LABELLED_ROW_REASONS = ("missing_meta",)
"""Why a kept row has no component: the keys a `labelled` counter may receive (such rows are not bad: `neoxray
prepare` keeps them, as component `unknown`, and counts them apart from the dropped ones)."""


def has_document_suffix(path: str | Path) -> bool:
    """True when `path` names a file that `iter_documents` reads (by suffix, case-insensitive)."""
    return str(path).lower().endswith(DOCUMENT_SUFFIXES)


def _is_jsonl(path: str | Path) -> bool:
    return str(path).lower().endswith(JSONL_SUFFIXES)


def _as_path(path: str | Path) -> str:
    """Local paths as given (str); URIs unchanged (Path() would fold their '//')."""
    return str(path)


def _open_binary(path: str | Path) -> BinaryIO:
    """Open `path` (local or a URI) for reading, transparently decompressing .gz and .zst (by suffix)."""
    name = str(path).lower()
    raw = _fs.open_input(str(path))
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)  # type: ignore[return-value]
    return raw


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file as a stream, frame after frame.

    Unlike zstandard's stream_reader, a file that ends inside a frame (truncated) raises EOFError instead of
    quietly ending early.
    """

    CHUNK = 1 << 16

    def __init__(self, fileobj: BinaryIO):
        self._file = fileobj
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read; None between frames
        self._input = b""  # compressed bytes read but not yet fed
        self._out = memoryview(b"")  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            if not self._input:
                self._input = self._file.read(self.CHUNK)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("compressed file ended before the end-of-frame marker was reached")
                    return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            data, self._input = self._input, b""
            self._out = memoryview(self._frame.decompress(data))
            if self._frame.eof:
                self._input = self._frame.unused_data
                self._frame = None
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def open_text_lines(path: str | Path, bad: Counter | None = None) -> Iterator[str]:
    """Yield the lines of a .jsonl / .jsonl.gz / .jsonl.zst file (any file, really) as str, newline kept.

    Decompresses as it goes. A line that is not valid UTF-8 is skipped and counted as bad["invalid_utf8"].
    A truncated or corrupt compressed stream raises NeoxrayError naming the file.
    """
    path = _as_path(path)
    with _open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, OSError) as e:
                raise NeoxrayError(f"{path}: corrupt or truncated file ({e})") from None
            line = _decode_utf8(raw, bad)
            if line is not None:
                yield line


def _decode_utf8(data: bytes, bad: Counter | None) -> str | None:
    """`data` as text, or None (counted in `bad` as "invalid_utf8") when it is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if bad is not None:
            bad["invalid_utf8"] += 1
        return None


def parse_pile_line(
    line: str, text_key: str = "text", bad: Counter | None = None, labelled: Counter | None = None
) -> tuple[str, str | None] | None:
    """Parse one JSON line into (text, pile_set_name), or return None (and count the reason in `bad`) if unusable.

    Blank lines return None without being counted: they carry no row. An empty text is unusable ("empty_text").
    A usable row without a string meta.pile_set_name comes back with None and is counted in `labelled`
    ("missing_meta").
    """
    if not line.strip():
        return None
    obj, reason = _json_object(line)
    if reason is None:
        if text_key not in obj:
            reason = "missing_text"
        elif not isinstance(obj[text_key], str):
            reason = "text_not_string"
        elif not obj[text_key]:
            reason = "empty_text"
        else:
            reason = _utf8_problem(obj[text_key])
    if reason is not None:
        if bad is not None:
            bad[reason] += 1
        return None
    return obj[text_key], _component(obj, labelled)


def _json_object(line: str) -> tuple[dict | None, str | None]:
    """(the line's JSON object, None), or (None, "invalid_json" | "not_an_object")."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None, "invalid_json"
    return (obj, None) if isinstance(obj, dict) else (None, "not_an_object")


def _utf8_problem(*texts: str) -> str | None:
    """ "invalid_utf8" when a text holds a lone surrogate (JSON escapes can smuggle them in: not text, not UTF-8)."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8"
    return None


def _component(obj: dict, labelled: Counter | None) -> str | None:
    """meta.pile_set_name of a usable row, or None (counted in `labelled` as "missing_meta")."""
    meta = obj.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        name = None
        if labelled is not None:
            labelled["missing_meta"] += 1
    return name


def parse_prompt_completion_line(
    line: str, bad: Counter | None = None, labelled: Counter | None = None
) -> tuple[str, str, str | None] | None:
    """Parse one JSON line into (prompt, completion, pile_set_name), or return None (and count the reason in
    `bad`) if unusable. A row gets one reason, the first of PROMPT_COMPLETION_BAD_ROW_REASONS' checks in this
    order: invalid_json, not_an_object, missing_prompt, missing_completion, prompt_not_string,
    completion_not_string, empty_completion, invalid_utf8 (lone surrogates in either string). The prompt may be
    empty. Blank lines return None without being counted; a missing component is counted in `labelled`."""
    if not line.strip():
        return None
    obj, reason = _json_object(line)
    if reason is None:
        if "prompt" not in obj:
            reason = "missing_prompt"
        elif "completion" not in obj:
            reason = "missing_completion"
        elif not isinstance(obj["prompt"], str):
            reason = "prompt_not_string"
        elif not isinstance(obj["completion"], str):
            reason = "completion_not_string"
        elif not obj["completion"]:
            reason = "empty_completion"
        else:
            reason = _utf8_problem(obj["prompt"], obj["completion"])
    if reason is not None:
        if bad is not None:
            bad[reason] += 1
        return None
    return obj["prompt"], obj["completion"], _component(obj, labelled)


def iter_prompt_completions(
    path: str | Path, bad: Counter | None = None, labelled: Counter | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """Yield (prompt, completion, pile_set_name) for each usable row of the JSON Lines file `path` (.jsonl,
    .jsonl.gz, .jsonl.zst; local or a URI), streaming; bad rows are skipped and counted in `bad` by reason
    (PROMPT_COMPLETION_BAD_ROW_REASONS), rows without a component counted in `labelled`."""
    for line in open_text_lines(_as_path(path), bad):
        row = parse_prompt_completion_line(line, bad, labelled)
        if row is not None:
            yield row


def iter_documents(
    path: str | Path, text_key: str = "text", bad: Counter | None = None, labelled: Counter | None = None
) -> Iterator[tuple[str, str | None]]:
    """Yield (text, pile_set_name) for each document in `path` (local or a URI), streaming.

    .jsonl/.jsonl.gz/.jsonl.zst: one document per valid line; pile_set_name from meta.pile_set_name, or None
    (counted in `labelled` as "missing_meta"). .txt (or any other suffix): the whole file is one document, with
    pile_set_name None (not counted). Malformed rows are skipped and counted in `bad` by reason (see
    `BAD_ROW_REASONS`).
    """
    path = _as_path(path)
    if not _is_jsonl(path):
        with _open_binary(path) as f:
            text = _decode_utf8(f.read(), bad)
        if text is None:
            return
        if not text:
            if bad is not None:
                bad["empty_text"] += 1
            return
        yield text, None
        return
    for line in open_text_lines(path, bad):
        doc = parse_pile_line(line, text_key, bad, labelled)
        if doc is not None:
            yield doc
