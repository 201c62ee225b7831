"""The typed, frozen data configuration."""

from __future__ import annotations

import dataclasses

# What a training batch may carry (a train objective names the fields it reads: training/objectives.py), with their
# dtypes: the windows [B, T+1] (+ multi-token prediction's extra targets), and per target (loss_weights) or per input
# token (segment_ids) [B, T].
BATCH_FIELDS = {
    "tokens": "int32",
    "loss_weights": "float32",
    "segment_ids": "int32",
    "chosen": "int32",  # preference pairs (data.format='preference'): prompt + chosen response [B, T+1]
    "chosen_weights": "float32",  # 1 on the targets that are response tokens [B, T]
    "rejected": "int32",
    "rejected_weights": "float32",
}
# The fields each data.format yields (data/pipeline.py text windows, data/formats.py records).
FORMAT_FIELDS = {
    "text": ("tokens", "loss_weights", "segment_ids"),
    "chat": ("tokens", "loss_weights", "segment_ids"),
    "preference": ("chosen", "chosen_weights", "rejected", "rejected_weights"),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = "stdlib"  # 'stdlib', a directory, a glob of text files, or a .jsonl file
    format: str = "text"  # a key of FORMAT_FIELDS: text documents, or JSONL chat / preference records
    train_on_prompt: bool = False  # format 'chat': learn every token, not only the assistant's
    tokenizer: str = "bytes"  # 'bytes', 'bpe:N', or a path to a tokenizer.json
    seq_len: int = 256
    val_fraction: float = 0.02  # share of documents held out, chosen by a hash of their name
    text_field: str = "text"  # JSONL field holding the text
    document_mask: bool = False  # attention stays inside documents; positions restart at each document start
    cache_dir: str = ""  # token store cache; '' = $XDG_CACHE_HOME/jax-lm/tokens
