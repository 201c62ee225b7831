"""The on-disk token store: each split tokenized once into a flat memmap, documents joined with
the end-of-document id, cached under a key of (corpus fingerprint, tokenizer fingerprint). Its meta.json
records each split's length and checksum, and a checksum of itself; a store that does not match them, or holds
an id outside the tokenizer's vocabulary, is rebuilt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import zlib

import numpy as np
from tqdm import tqdm

from data.corpus import Document
from data.errors import DataError
from data.tokenizer import Tokenizer

FORMAT_VERSION = 3  # 2: meta.json carries its checksum; 3: and each split's (CRC-32)
CHUNK_BYTES = 1 << 24  # read at a time when checking a split


@dataclasses.dataclass(frozen=True)
class TokenStore:
    path: pathlib.Path
    train: np.ndarray  # [N] token ids (memmap)
    val: np.ndarray
    meta: dict


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jax-lm" / "tokens"


def store_key(corpus_fingerprint: str, tokenizer: Tokenizer, val_fraction: float) -> str:
    ident = f"v{FORMAT_VERSION}|{corpus_fingerprint}|{tokenizer.fingerprint}|{val_fraction}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _tokenize(docs: list[Document], tokenizer: Tokenizer, out: pathlib.Path, dtype) -> tuple[int, int]:
    """Writes ids of docs (each followed by EOD) to `out`; returns (tokens, utf-8 bytes)."""
    n_tokens = n_bytes = 0
    # Shown only when tokenizing takes long (a big corpus, a BPE tokenizer): documents and tokens so far.
    progress = tqdm(total=len(docs), desc=f"tokenizing {out.stem}", unit=" docs", delay=2, file=sys.stderr)
    with out.open("wb") as f, progress:
        for start in range(0, len(docs), 256):
            chunk = docs[start : start + 256]
            for ids in tokenizer.encode_batch([d.text for d in chunk]):
                arr = np.asarray(ids + [tokenizer.eod_id], dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += arr.size
            n_bytes += sum(len(d.text.encode("utf-8")) for d in chunk)
            progress.update(len(chunk))
            progress.set_postfix_str(f"{n_tokens:,} tokens", refresh=False)
    return n_tokens, n_bytes


def meta_checksum(meta: dict) -> str:
    """sha256 of the metadata without its own checksum, in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def scan(file: pathlib.Path, dtype: str) -> tuple[int, int]:
    """(CRC-32 of the file's bytes, its largest token id; -1 when empty), in one pass of CHUNK_BYTES reads. Checked
    at every start, so it is cheap: 0.09 s for the 63 MB stdlib store on a shared 2-core machine (blake2b: 0.2 s).
    A CRC catches damage, not tampering, which is all a cache needs."""
    crc, largest = 0, -1
    with file.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            largest = max(largest, int(np.frombuffer(chunk, dtype).max()))
    return crc, largest


def mismatch(path: pathlib.Path, vocab_size: int) -> str | None:
    """Why the store at `path` cannot be used (unreadable or edited metadata, a split file whose length or
    checksum is not the recorded one, an id >= `vocab_size`), or None when it matches what was written."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"meta.json does not read back ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("checksum") != meta_checksum(meta):
        return "meta.json does not match its checksum"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        want = meta[split]["tokens"] * itemsize
        have = (path / f"{split}.bin").stat().st_size if (path / f"{split}.bin").exists() else None
        if have != want:
            return f"{split}.bin has {'no file' if have is None else f'{have} bytes'}, meta.json records {want}"
    for split in ("train", "val"):
        crc, largest = scan(path / f"{split}.bin", meta["dtype"])
        if crc != meta[split]["crc32"]:
            return f"{split}.bin does not match its checksum (changed in place)"
        if largest >= vocab_size:
            return f"{split}.bin holds token id {largest}, outside the tokenizer's {vocab_size} ids"
    return None


def _open(path: pathlib.Path) -> TokenStore:
    meta = json.loads((path / "meta.json").read_text())
    arrays = {
        # np.memmap cannot map an empty file; an empty split stays an empty array (load() then names it).
        split: np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r")
        if meta[split]["tokens"]
        else np.zeros(0, meta["dtype"])
        for split in ("train", "val")
    }
    return TokenStore(path, arrays["train"], arrays["val"], meta)


def build_token_store(train_docs, val_docs, tokenizer: Tokenizer, cache_dir: pathlib.Path, key: str) -> TokenStore:
    """Opens the cached store for `key`, tokenizing `train_docs()`/`val_docs()` on a miss.

    Written into a temporary directory and renamed into place, so a crash never leaves a half-written
    store under the final name. A cached store that no longer matches its metadata (a truncated, missing or
    overwritten split file, an edited meta.json) is removed with a warning and built again, never used.
    """
    path = cache_dir / key
    if path.exists():
        reason = mismatch(path, tokenizer.vocab_size)
        if reason is None:
            return _open(path)
        print(f"warning: token store {path} is damaged ({reason}); building it again", file=sys.stderr, flush=True)
        discard(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    tmp = pathlib.Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-"))
    try:
        meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "tokenizer": tokenizer.name}
        for split, docs in (("train", train_docs()), ("val", val_docs())):
            tokens, nbytes = _tokenize(docs, tokenizer, tmp / f"{split}.bin", dtype)
            crc, _ = scan(tmp / f"{split}.bin", dtype)
            meta[split] = {"documents": len(docs), "tokens": tokens, "bytes": nbytes, "crc32": crc}
        meta["checksum"] = meta_checksum(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (reason := mismatch(path, tokenizer.vocab_size)) is not None:
        raise DataError(f"token store {path} is not usable as soon as it is built ({reason}); is {cache_dir} full?")
    return _open(path)


def discard(path: pathlib.Path) -> None:
    """Moves a damaged store out of the way (one rename, so no process opens it half-deleted), then deletes it."""
    aside = path.with_name(f".{path.name}-damaged-{os.getpid()}")
    try:
        path.rename(aside)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)
