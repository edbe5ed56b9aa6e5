"""Paths for the data pipeline: local files or URIs on any filesystem pyarrow (or, failing that, fsspec) reaches.

A path is a plain string. Without a scheme it is local (`~` expanded, made absolute); with one (`s3://bucket/x`,
`gs://bucket/x`, `hdfs://...`, `file:///x`, or any fsspec protocol such as `memory://`) it is resolved through
`pyarrow.fs.FileSystem.from_uri`, or through fsspec wrapped as a pyarrow filesystem when pyarrow does not know
the scheme. Every error about a path is a `NeoxrayError` naming it.

Only a few operations are needed: list input files (files, folders, globs), open a file for reading, create
folders, write a file atomically enough (temporary name, then move), move and delete. On object stores a
"move" is a copy; what matters for us is that `manifest.json` is written last, so a dataset without it is
never mistaken for a finished one.
"""

from __future__ import annotations

import glob as _glob
import io
import os
import shutil
import uuid
from collections.abc import Iterable
from functools import lru_cache
from typing import BinaryIO

from neoxray.errors import NeoxrayError
from neoxray.paths import is_uri


def normalize(path: str | os.PathLike) -> str:
    """A local path made absolute (`~` expanded); a URI unchanged except for trailing slashes."""
    text = os.fspath(path)
    if is_uri(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else text
    return os.path.abspath(os.path.expanduser(text))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


@lru_cache(maxsize=64)
def _filesystem_for(scheme_and_authority: str):
    """(pyarrow filesystem, uses_fsspec) for `scheme://authority`, cached per process (S3 resolves regions)."""
    import pyarrow.fs as pafs

    try:
        fs, _ = pafs.FileSystem.from_uri(scheme_and_authority + "/")
        return fs, False
    except Exception as arrow_error:  # unknown scheme (ArrowInvalid) or, for s3, a failed region lookup
        try:
            import fsspec
        except ImportError:
            raise NeoxrayError(f"{scheme_and_authority}: cannot open this filesystem ({arrow_error})") from None
        scheme = scheme_and_authority.split("://", 1)[0]
        try:
            handler = pafs.FSSpecHandler(fsspec.filesystem(scheme))
        except Exception as e:
            raise NeoxrayError(
                f"{scheme_and_authority}: cannot open this filesystem (pyarrow: {arrow_error}; fsspec: {e})"
            ) from None
        return pafs.PyFileSystem(handler), True


def resolve(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), normalize(path)
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    authority, _, inner = rest.partition("/")
    fs, via_fsspec = _filesystem_for(f"{scheme}://{authority}")
    if via_fsspec:
        # fsspec filesystems take the path with its authority (bucket) but without the scheme
        return fs, f"{authority}/{inner}".rstrip("/") if scheme != "memory" else "/" + f"{authority}/{inner}".strip("/")
    return fs, f"{authority}/{inner}".rstrip("/")


def _info(path: str):
    fs, inner = resolve(path)
    try:
        return fs, inner, fs.get_file_info(inner)
    except OSError as e:
        raise NeoxrayError(f"{path}: cannot access ({e})") from None


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(path):
        return os.path.exists(path)
    return _info(path)[2].type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(path):
        return os.path.isfile(path)
    return _info(path)[2].type == pafs.FileType.File


def file_size(path: str) -> int:
    import pyarrow.fs as pafs

    if not is_uri(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            raise NeoxrayError(f"{path}: no such file") from None
    info = _info(path)[2]
    if info.type != pafs.FileType.File:
        raise NeoxrayError(f"{path}: no such file")
    return int(info.size)


def open_input(path: str) -> BinaryIO:
    """Open a file for reading as raw bytes (no decompression), or raise NeoxrayError naming it."""
    if not is_uri(path):
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NeoxrayError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise NeoxrayError(f"{path}: is a directory, expected a file") from None
        except OSError as e:
            raise NeoxrayError(f"{path}: cannot open ({e.strerror or e})") from None
    import pyarrow.fs as pafs

    fs, inner, info = _info(path)
    if info.type == pafs.FileType.NotFound:
        raise NeoxrayError(f"{path}: no such file")
    if info.type == pafs.FileType.Directory:
        raise NeoxrayError(f"{path}: is a directory, expected a file")
    try:
        native = fs.open_input_stream(inner, compression=None)  # we decompress ourselves, by suffix
    except OSError as e:
        raise NeoxrayError(f"{path}: cannot open ({e})") from None
    return io.BufferedReader(_NativeRaw(native), buffer_size=1 << 20)  # type: ignore[return-value]


class _NativeRaw(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream (so that line iteration and io.Buffered* work)."""

    def __init__(self, native):
        self._native = native

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self._native.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._native.close()
        super().close()


def open_random_access(path: str):
    """A seekable file (for Parquet footers and row groups)."""
    if not is_uri(path):
        return open_input(path)
    fs, inner = resolve(path)
    try:
        return fs.open_input_file(inner)
    except FileNotFoundError:
        raise NeoxrayError(f"{path}: no such file") from None
    except OSError as e:
        raise NeoxrayError(f"{path}: cannot open ({e})") from None


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def makedirs(path: str) -> None:
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def open_output(path: str):
    """A writable binary stream (the parent folder must exist for local paths)."""
    if not is_uri(path):
        return open(path, "wb")
    fs, inner = resolve(path)
    return fs.open_output_stream(inner)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` to a temporary sibling, then move it onto `path` (a rename on local disks)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open_output(tmp) as f:
        f.write(data)
    move(tmp, path)


def move(src: str, dst: str) -> None:
    """Rename a file or folder (local: atomic rename); on object stores, folders move file by file."""
    import pyarrow.fs as pafs

    if not is_uri(src):
        os.replace(src, dst)
        return
    fs, a, info = _info(src)
    _, b = resolve(dst)
    if info.type != pafs.FileType.Directory:
        fs.move(a, b)
        return
    fs.create_dir(b, recursive=True)
    for entry in fs.get_file_info(pafs.FileSelector(a, recursive=True)):
        if entry.type == pafs.FileType.File:
            rel = entry.path[len(a.rstrip("/")) :].lstrip("/")
            fs.move(entry.path, f"{b.rstrip('/')}/{rel}")
    fs.delete_dir(a)


def delete(path: str) -> None:
    """Delete a file or a folder tree; nothing happens if it does not exist."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=False)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, inner, info = _info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif info.type == pafs.FileType.File:
        fs.delete_file(inner)


def list_dir(path: str) -> list[str]:
    """Names (not paths) of the entries directly inside folder `path`; [] when it does not exist."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, inner, info = _info(path)
    if info.type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(inner, recursive=False)))


def expand_inputs(inputs: Iterable[str | os.PathLike], suffixes: tuple[str, ...], what: str = "input") -> list[str]:
    """Files, folders (searched recursively for `suffixes`) and globs -> a list of file paths, without duplicates.

    Folders and globs are expanded in sorted order; the order of `inputs` is kept. A missing input, a glob that
    matches nothing, an explicitly named file with another suffix, and finding no file at all are NeoxrayErrors
    naming the input.
    """
    import pyarrow.fs as pafs

    items = [os.fspath(i) for i in inputs]
    if not items:
        raise NeoxrayError(f"no {what} given")
    out: list[str] = []

    def ok(name: str) -> bool:
        return name.lower().endswith(suffixes)

    def walk(folder: str) -> list[str]:
        return sorted(os.path.join(d, f) for d, _, names in os.walk(folder, followlinks=True) for f in names if ok(f))

    for item in items:
        if not is_uri(item):
            path = normalize(item)
            if os.path.isdir(path):
                out.extend(walk(path))
            elif os.path.isfile(path):
                if not ok(path):
                    raise NeoxrayError(f"{what} {item}: unsupported file type (expected {', '.join(suffixes)})")
                out.append(path)
            elif _glob.has_magic(item):
                matches = sorted(_glob.glob(os.path.expanduser(item), recursive=True))
                if not matches:
                    raise NeoxrayError(f"{what} {item}: the pattern matches no files")
                for m in matches:
                    if os.path.isdir(m):
                        out.extend(walk(normalize(m)))
                    elif ok(m):
                        out.append(normalize(m))
            else:
                raise NeoxrayError(f"{what} {item}: no such file or directory")
            continue
        # a URI
        uri = normalize(item)
        scheme = uri.split("://", 1)[0]
        fs, inner = resolve(uri)
        if _glob.has_magic(uri.split("://", 1)[1]):
            try:
                import fsspec
            except ImportError:
                raise NeoxrayError(f"{what} {item}: globs on remote filesystems need fsspec installed") from None
            try:
                matches = sorted(fsspec.filesystem(scheme).glob(uri))
            except Exception as e:
                raise NeoxrayError(f"{what} {item}: cannot list ({e})") from None
            matches = [m if "://" in m else f"{scheme}://{m.lstrip('/')}" for m in matches]
            if not matches:
                raise NeoxrayError(f"{what} {item}: the pattern matches no files")
            out.extend(m for m in matches if ok(m))
            continue
        try:
            info = fs.get_file_info(inner)
        except OSError as e:
            raise NeoxrayError(f"{what} {item}: cannot access ({e})") from None
        if info.type == pafs.FileType.File:
            if not ok(uri):
                raise NeoxrayError(f"{what} {item}: unsupported file type (expected {', '.join(suffixes)})")
            out.append(uri)
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            base_inner = inner.rstrip("/")
            for i in sorted(infos, key=lambda x: x.path):
                if i.type == pafs.FileType.File and ok(i.path):
                    rel = i.path[len(base_inner) :].lstrip("/") if i.path.startswith(base_inner) else i.base_name
                    out.append(join(uri, rel))
        else:
            raise NeoxrayError(f"{what} {item}: no such file or directory")
    unique = list(dict.fromkeys(out))
    if not unique:
        raise NeoxrayError(f"no {what} files found in {', '.join(items)} (looked for {', '.join(suffixes)})")
    return unique
