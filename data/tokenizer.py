"""Tokenizers: `bytes` (UTF-8 bytes plus an end-of-document id), `bpe:N` (a byte-level BPE trained
locally with the `tokenizers` library and cached in the workdir), or a path to a `tokenizer.json`.

Each tokenizer also knows how many UTF-8 bytes every token stands for, so evaluation reports bits
per byte that compare across tokenizers.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import tokenizers
from tqdm import tqdm

from data.errors import DataError

EOD = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str  # the spec it came from
    fingerprint: str  # changes whenever the vocabulary does (cache keys)
    vocab_size: int
    eod_id: int
    document_start: list[int]  # the ids a document (and so a prompt) starts with
    token_bytes: np.ndarray  # [vocab_size] UTF-8 bytes each token decodes to (0 for specials)

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_tokenizers(self) -> tokenizers.Tokenizer: ...  # the same ids as a `tokenizers` tokenizer


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes; 256 ends a document."""

    name = fingerprint = "bytes"
    vocab_size = 257
    eod_id = 256
    document_start = [256]

    def __init__(self):
        self.token_bytes = np.concatenate([np.ones(256, np.int32), np.zeros(1, np.int32)])

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The same ids as a `tokenizers` tokenizer (what a Hugging Face export writes as tokenizer.json): a
        byte-level BPE without merges whose token for byte b (GPT-2's printable character for it) has id b, and
        EOD with id 256. It encodes text to `encode`'s ids, except that it reads the text EOD as the special token
        (transformers' `split_special_tokens=True` turns that off)."""
        chars = byte_level_chars()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.add_special_tokens([EOD])
        assert tok.token_to_id(EOD) == self.eod_id
        return tok


def byte_level_chars() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE spells it with (GPT-2's `bytes_to_unicode`, which the
    `tokenizers` ByteLevel pre-tokenizer and decoder use): printable Latin-1 bytes stand for themselves, the others
    for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


class HFTokenizer:
    """A `tokenizers` tokenizer with an end-of-document special token."""

    def __init__(self, tok: tokenizers.Tokenizer, name: str):
        self.tok, self.name = tok, name
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eod = tok.token_to_id(EOD)
        self.eod_id = eod if eod is not None else self._fallback_eod()
        # What a document starts with: the tokens the tokenizer's template puts first (a Llama 3 tokenizer's
        # <|begin_of_text|>), else the end-of-document token of the document before.
        self.document_start = tok.encode("", add_special_tokens=True).ids or [self.eod_id]
        self.token_bytes = self._token_bytes()

    def _fallback_eod(self) -> int:
        for special in ("</s>", "<eos>", "<|end_of_text|>", "[SEP]"):
            if (i := self.tok.token_to_id(special)) is not None:
                return i
        raise DataError(f"tokenizer {self.name}: has no end-of-document token (looked for {EOD!r}, '</s>', '<eos>')")

    def _token_bytes(self) -> np.ndarray:
        specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        byte_level = "ByteLevel" in self.tok.to_str()
        out = np.zeros(self.vocab_size, np.int32)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if token in specials:
                continue
            # Byte-level BPE spells each byte as one printable character.
            out[i] = len(token) if byte_level else len(token.replace("\u2581", " ").encode("utf-8"))
        return out

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: pathlib.Path) -> None:
        self.tok.save(str(path))

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        return self.tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_counted(texts, vocab_size), trainer=trainer)
    return tok


def _counted(texts: Iterable[str], vocab_size: int) -> Iterator[str]:
    """`texts`, with a progress line (documents and characters read, then the merges) when training takes long."""
    with tqdm(desc=f"training bpe:{vocab_size}", unit=" docs", delay=2, file=sys.stderr) as progress:
        chars = 0
        for text in texts:
            chars += len(text)
            progress.update(1)
            progress.set_postfix_str(f"{chars:,} characters", refresh=False)
            yield text
        progress.set_postfix_str(f"{chars:,} characters read; computing merges", refresh=False)


def load_file(path: pathlib.Path, name: str) -> HFTokenizer:
    try:
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), name)
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise DataError(
            f"data.tokenizer={name!r}: cannot read {path} as a tokenizer.json ({str(e).splitlines()[0]})"
        ) from None


def bpe_vocab_size(spec: str) -> int | None:
    """N for a `bpe:N` spec, None for other specs."""
    if not spec.startswith("bpe:"):
        return None
    try:
        n = int(spec[4:])
    except ValueError:
        n = 0
    if n < 257:
        raise DataError(
            f"data.tokenizer={spec!r}: N in 'bpe:N' must be an integer >= 257 (256 bytes + end-of-document)"
        )
    return n


def planned_vocab_size(spec: str) -> int:
    """The vocabulary size `spec` gives, without training or reading a corpus (for planning: --dry_run)."""
    if spec == "bytes":
        return ByteTokenizer.vocab_size
    if (n := bpe_vocab_size(spec)) is not None:
        return n
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer={spec!r}: not 'bytes', 'bpe:N', or an existing tokenizer.json file")
    return load_file(path, spec).vocab_size


def cache_tokenizer(tok: HFTokenizer, workdir: pathlib.Path) -> None:
    """Writes `tok` as the workdir's tokenizer.json, the one a `bpe:N` spec reads back (atomically, through a
    temporary file per process: every process of a multi-host run writes the same file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f"tokenizer.json.{os.getpid()}.tmp"
    tok.save(tmp)
    tmp.replace(workdir / "tokenizer.json")


def build_tokenizer(spec: str, workdir: pathlib.Path, train_texts) -> Tokenizer:
    """The tokenizer for `spec`; `bpe:N` is trained on `train_texts()` once and cached in workdir."""
    if spec == "bytes":
        return ByteTokenizer()
    if (n := bpe_vocab_size(spec)) is not None:
        cached = workdir / "tokenizer.json"
        if cached.exists():
            tok = load_file(cached, spec)
            if tok.vocab_size == n:
                return tok
        tok = HFTokenizer(train_bpe(train_texts(), n), spec)
        cache_tokenizer(tok, workdir)
        return tok
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer={spec!r}: not 'bytes', 'bpe:N', or an existing tokenizer.json file")
    return load_file(path, spec)


def tokenizer_to_dict(tok: Tokenizer) -> dict:
    """JSON-able form of `tok` for checkpoints: its spec and, for `tokenizers` tokenizers, their JSON."""
    return {"spec": tok.name, "json": tok.tok.to_str() if isinstance(tok, HFTokenizer) else None}


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuilds a tokenizer from `tokenizer_to_dict` output, without its training corpus."""
    if d["json"] is None:
        return ByteTokenizer()
    return HFTokenizer(tokenizers.Tokenizer.from_str(d["json"]), d["spec"])
