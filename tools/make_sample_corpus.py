#!/usr/bin/env python3
"""Rebuild the bundled sample corpus neoxray/pipelines/sample/sample.jsonl.zst (Pile format).

Every document is real text of a known licence already present on a Linux machine with CPython installed:

- "Github":      source files of the CPython standard library (PSF License 2.0), one file per document.
- "Python-Docs": the Python reference-manual topics shipped as pydoc_data/topics.py (PSF License 2.0),
                 one topic per document.
- "Licenses":    the licence texts in /usr/share/common-licenses plus the stdlib's own LICENSE.txt
                 (each text permits verbatim copying), one licence per document.

The output is deterministic for a given stdlib and licences folder: inputs are sorted, the selection rule
is fixed, documents are shuffled with a fixed seed and compressed at a fixed zstd level. The shipped file
was built from CPython 3.11.7 on Debian; see neoxray/pipelines/sample/README.md.

    python tools/make_sample_corpus.py [--stdlib DIR] [--licenses DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import runpy
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "neoxray" / "pipelines" / "sample" / "sample.jsonl.zst"

MAX_MODULE_BYTES = 64 * 1024
"""Library modules larger than this are left out (keeps the file small; big modules add little variety)."""
MAX_TEST_BYTES = 16 * 1024
"""Test modules (under test/, tests/, idle_test/) larger than this are left out."""
MIN_CHARS = 200
"""Documents shorter than this (empty __init__.py files and the like) are left out."""
TEST_DIRS = {"test", "tests", "idle_test"}
SEED = 20240601
ZSTD_LEVEL = 19


def _read_utf8(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None  # a few test files are deliberately in other encodings
    return None if "\x00" in text else text


def stdlib_sources(stdlib: Path) -> list[dict]:
    docs = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib)
        if rel.parts[0] == "site-packages" or "__pycache__" in rel.parts:
            continue
        if path.name.startswith("_sysconfigdata"):
            continue  # build-machine specific paths, not source
        if not path.is_file() or path.is_symlink():
            continue
        limit = MAX_TEST_BYTES if TEST_DIRS.intersection(rel.parts[:-1]) else MAX_MODULE_BYTES
        if path.stat().st_size > limit:
            continue
        text = _read_utf8(path)
        if text is None or len(text.strip()) < MIN_CHARS:
            continue
        docs.append({"text": text, "meta": {"pile_set_name": "Github"}})
    return docs


def python_docs(stdlib: Path) -> list[dict]:
    topics = runpy.run_path(str(stdlib / "pydoc_data" / "topics.py"))["topics"]
    docs = []
    for key in sorted(topics):
        text = topics[key]
        if len(text.strip()) >= MIN_CHARS:
            docs.append({"text": text, "meta": {"pile_set_name": "Python-Docs"}})
    return docs


def licence_texts(licenses: Path, stdlib: Path) -> list[dict]:
    paths = sorted(p for p in licenses.iterdir() if p.is_file() and not p.is_symlink())
    if (stdlib / "LICENSE.txt").is_file():
        paths.append(stdlib / "LICENSE.txt")
    docs = []
    for path in paths:
        text = _read_utf8(path)
        if text is not None and len(text.strip()) >= MIN_CHARS:
            docs.append({"text": text, "meta": {"pile_set_name": "Licenses"}})
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--licenses", type=Path, default=Path("/usr/share/common-licenses"))
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args(argv)
    for d in (args.stdlib, args.licenses):
        if not d.is_dir():
            print(f"error: {d}: no such directory", file=sys.stderr)
            return 1

    docs = stdlib_sources(args.stdlib) + python_docs(args.stdlib) + licence_texts(args.licenses, args.stdlib)
    random.Random(SEED).shuffle(docs)
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(compressed)

    counts = Counter(d["meta"]["pile_set_name"] for d in docs)
    chars = Counter()
    for d in docs:
        chars[d["meta"]["pile_set_name"]] += len(d["text"])
    print(f"wrote {args.output}: {len(docs)} documents, {len(data):,} bytes raw, {len(compressed):,} bytes zstd")
    for name in sorted(counts):
        print(f"  {name:12s} {counts[name]:5d} documents  {chars[name]:>11,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
