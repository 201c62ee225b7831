"""The on-disk token store: each split tokenized once into a flat memmap, documents joined with
the end-of-document id, cached under a key of (corpus fingerprint, tokenizer fingerprint). Its meta.json
records each split's length and a checksum of itself; a store that does not match them is rebuilt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
from tqdm import tqdm

from data.corpus import Document
from data.errors import DataError
from data.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: meta.json carries its checksum


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


def mismatch(path: pathlib.Path) -> str | None:
    """Why the store at `path` cannot be used (unreadable or edited metadata, a split file whose length is not
    the recorded token count), or None when it matches what was written."""
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
    store under the final name. A cached store that no longer matches its metadata (a truncated or
    missing split file, an edited meta.json) is removed with a warning and built again, never used.
    """
    path = cache_dir / key
    if path.exists():
        reason = mismatch(path)
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
            meta[split] = {"documents": len(docs), "tokens": tokens, "bytes": nbytes}
        meta["checksum"] = meta_checksum(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (reason := mismatch(path)) is not None:
        raise DataError(f"token store {path} does not read back as written ({reason}); is {cache_dir} full?")
    return _open(path)


def discard(path: pathlib.Path) -> None:
    """Moves a damaged store out of the way (one rename, so no process opens it half-deleted), then deletes it."""
    aside = path.with_name(f".{path.name}-damaged-{os.getpid()}")
    try:
        path.rename(aside)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)
