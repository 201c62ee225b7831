"""Corpora: where documents come from and how they split into train and validation.

A corpus spec is `stdlib` (the running interpreter's standard library `*.py` sources, present on
every machine), a directory of text files, a glob of text files, or a `.jsonl` file with a text
field. The split is a deterministic function of each document's name, so it never depends on
file order or on the machine.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence

from data.errors import DataError

STDLIB = "stdlib"


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # stable identifier: relative path, or path:line for JSONL
    text: str


def is_validation(name: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


@functools.cache
def stdlib_files() -> tuple[pathlib.Path, tuple[pathlib.Path, ...]]:
    """The standard library's .py files, walked once per process (~2-4 s each time on a small VM; what is installed
    does not change under a running program, and `fingerprint` still reads each file's size and time)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = tuple(p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts))
    return root, files


def resolve_files(spec: str) -> tuple[pathlib.Path, Sequence[pathlib.Path]]:
    """(root, files) of a file-based corpus spec; names are paths relative to root."""
    if spec == STDLIB:
        return stdlib_files()
    path = pathlib.Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"data.corpus={spec!r}: the glob matches no files")
        return pathlib.Path(os.path.commonpath([p.parent for p in files])), files
    if not path.exists():
        raise DataError(
            f"data.corpus={spec!r}: no such file or directory (allowed: 'stdlib', a directory, a glob, a .jsonl file)"
        )
    if path.is_dir():
        return path, [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return path.parent, [path]


def fingerprint(spec: str, text_field: str) -> str:
    """Changes when the corpus files change (names, sizes, modification times)."""
    root, files = resolve_files(spec)
    h = hashlib.sha256(f"{spec}|{text_field}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_documents(spec: str, text_field: str = "text") -> Iterator[Document]:
    """Every non-empty document of the corpus, in a fixed order."""
    root, files = resolve_files(spec)
    for path in files:
        name = str(path.relative_to(root)) if path != root else path.name
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, name, text_field)
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            if len(files) == 1:
                raise DataError(f"data.corpus={spec!r}: {path} is not UTF-8 text") from None
            continue  # a binary file inside a directory of text files
        if text:
            yield Document(name, text)


def _jsonl_documents(path: pathlib.Path, name: str, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{path}:{i + 1}: not a JSON object with a string field data.text_field={text_field!r}"
                ) from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{i + 1}: field {text_field!r} is {type(text).__name__}, expected a string")
            if text:
                yield Document(f"{name}:{i}", text)


def split_documents(spec: str, text_field: str, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation); raises DataError when either side is empty."""
    train, val = [], []
    for doc in read_documents(spec, text_field):
        (val if is_validation(doc.name, val_fraction) else train).append(doc)
    if not train and not val:
        raise DataError(f"data.corpus={spec!r}: the corpus is empty (no non-empty UTF-8 documents)")
    if not val:  # tiny corpora: hold out the last document so evaluation always has data
        val = [train.pop()]
    if not train:
        train = [val.pop(0)] if len(val) > 1 else []
    if not train:
        raise DataError(f"data.corpus={spec!r}: needs at least two documents to split into train and validation")
    return train, val
