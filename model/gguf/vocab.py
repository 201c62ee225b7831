"""A tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary, so llama.cpp reads text into our ids.

Our tokenizers are `tokenizers` byte-level BPEs (data/tokenizer.py: `bpe:N` and the byte tokenizer's
`to_tokenizers()`). llama.cpp's `gpt2` model is the same algorithm over the same byte alphabet: the token strings,
their ranked merges and a pre-tokenizer chosen by name (`tokenizer.ggml.pre`). `tokenizers`' ByteLevel pre-tokenizer
splits text with GPT-2's regex, `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`,
which llama.cpp's `gpt-2` pre-tokenizer implements (llama-vocab.cpp; unicode.cpp's custom GPT-2 splitter matches
the `\\s+(?!\\S)|\\s+` tail). tests/test_gguf.py checks llama.cpp's ids against ours on code, Unicode, whitespace
runs and digits.

The byte tokenizer (no regex, no merges) maps too: without merges every byte is its own token whatever the split.
GGUF has no empty arrays, so its merge list holds one merge that never applies: of byte 0xC0 with itself, a byte
UTF-8 text never contains.

Special tokens are CONTROL tokens: llama.cpp reads their text as the token only when asked to parse specials
(`tokenize(..., special=True)`), where our `encode` always does for the BPE tokenizers (and never for the byte
tokenizer, as llama.cpp without `special`). Anything else (a normalizer, another pre-tokenizer, a model other than
BPE) is refused in one line, as llama.cpp would read text differently.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import tokenizers


class VocabError(ValueError):
    """A tokenizer llama.cpp would not read text with as we do (one line, naming what differs)."""


PRE = "gpt-2"  # llama.cpp's name for GPT-2's regex pre-tokenizer (tokenizers' ByteLevel with use_regex)
NEVER_MERGED = "\u00c0 \u00c0"  # byte 0xC0 (byte-level BPE spells it "À") twice: never in UTF-8 text


@dataclasses.dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # by id: the byte-level BPE strings ("Ġthe"), "[PADi]" for ids the tokenizer leaves out
    types: list[int]  # gguf.TokenType by id
    merges: list[str]  # "left right", highest priority first
    bos_id: int  # what llama.cpp puts first (add_bos_token): our models' document start
    eos_id: int  # end of document: llama.cpp stops generating there
    pad_id: int

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges or [NEVER_MERGED])
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)


def from_tokenizers(tok: tokenizers.Tokenizer, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> Vocab:
    """`tok` as a `vocab_size`-token GGUF vocabulary (the model's embedding rows: ids past the tokenizer's are
    unused padding); VocabError when llama.cpp would split or merge text differently."""
    spec = json.loads(tok.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"tokenizer model {model.get('type')!r}: only byte-level BPE maps to llama.cpp's gpt2")
    if spec.get("normalizer") is not None:
        raise VocabError(f"tokenizer normalizer {spec['normalizer'].get('type')!r}: llama.cpp's gpt2 has none")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        what = pre.get("type") if pre.get("type") != "ByteLevel" else "ByteLevel with add_prefix_space"
        raise VocabError(f"tokenizer pre-tokenizer {what!r}: only ByteLevel without a prefix space maps to {PRE!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if merges and not pre.get("use_regex", True):
        raise VocabError("tokenizer pre-tokenizer ByteLevel(use_regex=False) with merges: llama.cpp always splits")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise VocabError(f"tokenizer BPE {key}={model[key]!r}: llama.cpp's gpt2 has none")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        raise VocabError("tokenizer BPE byte_fallback/ignore_merges: llama.cpp's gpt2 (with 'gpt-2') has neither")

    ids = tok.get_vocab(with_added_tokens=True)
    if max(ids.values()) >= vocab_size:
        raise VocabError(f"tokenizer has id {max(ids.values())}, the model only {vocab_size} embedding rows")
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        if token not in added:
            types[i] = gguf.TokenType.NORMAL
        else:
            types[i] = gguf.TokenType.CONTROL if added[token]["special"] else gguf.TokenType.USER_DEFINED
    return Vocab(tokens, [int(t) for t in types], merges, bos_id, eos_id, pad_id)
