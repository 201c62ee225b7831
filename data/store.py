"""The on-disk token store: each split tokenized once into a flat memmap, documents joined with
the end-of-document id, cached under a key of (corpus fingerprint, tokenizer fingerprint)."""

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
from data.tokenizer import Tokenizer

FORMAT_VERSION = 1


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


def _open(path: pathlib.Path) -> TokenStore:
    meta = json.loads((path / "meta.json").read_text())
    arrays = {split: np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r") for split in ("train", "val")}
    return TokenStore(path, arrays["train"], arrays["val"], meta)


def build_token_store(train_docs, val_docs, tokenizer: Tokenizer, cache_dir: pathlib.Path, key: str) -> TokenStore:
    """Opens the cached store for `key`, tokenizing `train_docs()`/`val_docs()` on a miss.

    Written into a temporary directory and renamed into place, so a crash never leaves a
    half-written store under the final name.
    """
    path = cache_dir / key
    if (path / "meta.json").exists():
        return _open(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    tmp = pathlib.Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-"))
    try:
        meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "tokenizer": tokenizer.name}
        for split, docs in (("train", train_docs()), ("val", val_docs())):
            tokens, nbytes = _tokenize(docs, tokenizer, tmp / f"{split}.bin", dtype)
            meta[split] = {"documents": len(docs), "tokens": tokens, "bytes": nbytes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(path)
