"""Streaming readers for Pile-format shards and plain-text documents.

A Pile shard is JSON Lines, optionally gzip- or zstd-compressed: one object per line, the document under
"text" and its component under meta.pile_set_name, e.g.
``{"text": "...", "meta": {"pile_set_name": "Github"}}``.

Everything here streams: a shard is decompressed and parsed one line at a time, never held in memory whole.
Rows that cannot be used are skipped, not fatal; pass a `collections.Counter` as `bad` to learn how many were
skipped and why (keys are the reasons in `BAD_ROW_REASONS`).
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from neoxray.errors import NeoxrayError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
"""Pile shards: JSON Lines, plain, gzip or zstd."""
TEXT_SUFFIXES = (".txt",)
"""Plain-text files: the whole file is one document."""
DOCUMENT_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES

BAD_ROW_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_text", "text_not_string")
"""Why a row was skipped: the keys a `bad` counter may receive."""


def has_document_suffix(path: str | Path) -> bool:
    """True when `path` names a file that `iter_documents` reads (by suffix, case-insensitive)."""
    return str(path).lower().endswith(DOCUMENT_SUFFIXES)


def _is_jsonl(path: Path) -> bool:
    return str(path).lower().endswith(JSONL_SUFFIXES)


def _open_binary(path: Path) -> BinaryIO:
    """Open `path` for reading, transparently decompressing .gz and .zst (by suffix)."""
    name = str(path).lower()
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise NeoxrayError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NeoxrayError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise NeoxrayError(f"{path}: cannot open ({e.strerror or e})") from None
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
    path = Path(path)
    with _open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, OSError) as e:
                raise NeoxrayError(f"{path}: corrupt or truncated file ({e})") from None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if bad is not None:
                    bad["invalid_utf8"] += 1
                continue
            yield line


def parse_pile_line(line: str, text_key: str = "text", bad: Counter | None = None) -> tuple[str, str | None] | None:
    """Parse one JSON line into (text, pile_set_name), or return None (and count the reason) if unusable.

    Blank lines return None without being counted: they carry no row.
    """
    if not line.strip():
        return None
    reason = None
    try:
        obj = json.loads(line)
    except ValueError:
        reason = "invalid_json"
    else:
        if not isinstance(obj, dict):
            reason = "not_an_object"
        elif text_key not in obj:
            reason = "missing_text"
        elif not isinstance(obj[text_key], str):
            reason = "text_not_string"
    if reason is not None:
        if bad is not None:
            bad[reason] += 1
        return None
    meta = obj.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return obj[text_key], name if isinstance(name, str) else None


def iter_documents(
    path: str | Path, text_key: str = "text", bad: Counter | None = None
) -> Iterator[tuple[str, str | None]]:
    """Yield (text, pile_set_name) for each document in `path`, streaming.

    .jsonl/.jsonl.gz/.jsonl.zst: one document per valid line; pile_set_name from meta.pile_set_name, or None.
    .txt (or any other suffix): the whole file is one document, with pile_set_name None.
    Malformed rows are skipped and counted in `bad` by reason (see `BAD_ROW_REASONS`).
    """
    path = Path(path)
    if not _is_jsonl(path):
        with _open_binary(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if bad is not None:
                bad["invalid_utf8"] += 1
            return
        yield text, None
        return
    for line in open_text_lines(path, bad):
        doc = parse_pile_line(line, text_key, bad)
        if doc is not None:
            yield doc
