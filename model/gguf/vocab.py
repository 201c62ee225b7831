"""A tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary, so llama.cpp reads text into our ids.

Our tokenizers are `tokenizers` byte-level BPEs (data/tokenizer.py: `bpe:N` and the byte tokenizer's
`to_tokenizers()`). llama.cpp's `gpt2` model is the same algorithm over the same byte alphabet: the token strings,
their ranked merges and a pre-tokenizer chosen by name (`tokenizer.ggml.pre`, `PRE_TOKENIZERS`). `tokenizers`'
ByteLevel pre-tokenizer splits text with GPT-2's regex, `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`, which llama.cpp's `gpt-2` pre-tokenizer implements (llama-vocab.cpp;
unicode.cpp's custom GPT-2 splitter matches the `\\s+(?!\\S)|\\s+` tail). A Llama 3 tokenizer.json (its regex split,
then ByteLevel without one, whole-word tokens kept: `ignore_merges`) is llama.cpp's `llama-bpe`. tests/test_gguf.py
checks llama.cpp's ids against ours on code, Unicode, whitespace runs and digits, for both.

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


# llama.cpp's pre-tokenizers, by the regex a tokenizer splits text with before its byte-level step (None: tokenizers'
# ByteLevel with use_regex, GPT-2's), with the BPE `ignore_merges` each assumes (llama.cpp sets it for llama3).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str | None, tuple[str, bool]] = {None: ("gpt-2", False), LLAMA3_REGEX: ("llama-bpe", True)}
NEVER_MERGED = "\u00c0 \u00c0"  # byte 0xC0 (byte-level BPE spells it "À") twice: never in UTF-8 text


@dataclasses.dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # by id: the byte-level BPE strings ("Ġthe"), "[PADi]" for ids the tokenizer leaves out
    types: list[int]  # gguf.TokenType by id
    merges: list[str]  # "left right", highest priority first
    pre: str  # llama.cpp's pre-tokenizer (a name of PRE_TOKENIZERS)
    bos_id: int  # what llama.cpp puts first (add_bos_token): our models' document start
    eos_id: int  # end of document: llama.cpp stops generating there
    pad_id: int

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
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
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    regex = _split_regex(pre, bool(merges))
    if regex not in PRE_TOKENIZERS:
        raise VocabError(f"tokenizer splits text with the regex {regex!r}: not one of llama.cpp's we map")
    name, ignore_merges = PRE_TOKENIZERS[regex]
    if bool(model.get("ignore_merges")) != ignore_merges:
        raise VocabError(
            f"tokenizer BPE ignore_merges={model.get('ignore_merges')}: llama.cpp's {name!r} assumes {ignore_merges}"
        )
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise VocabError(f"tokenizer BPE {key}={model[key]!r}: llama.cpp's gpt2 has none")

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
    return Vocab(tokens, [int(t) for t in types], merges, name, bos_id, eos_id, pad_id)


def _split_regex(pre: dict, has_merges: bool) -> str | None:
    """The regex `pre` (a tokenizer.json pre-tokenizer) splits text with before the byte-level step: None for
    ByteLevel's own (GPT-2's), or for no split where it cannot matter (no merges); VocabError for other shapes."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False}
    if pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space"):
        if pre.get("use_regex", True) or not has_merges:
            return None
        raise VocabError("tokenizer pre-tokenizer ByteLevel(use_regex=False) with merges: llama.cpp always splits")
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2:
        split, last = steps
        plain_split = split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
        unsplit_bytes = {k: last.get(k) for k in byte_level} == byte_level and last.get("use_regex") is False
        if plain_split and unsplit_bytes and "Regex" in (split.get("pattern") or {}):
            return split["pattern"]["Regex"]
    raise VocabError(f"tokenizer pre-tokenizer {pre.get('type')!r}: not a regex split then byte-level, as llama.cpp's")
