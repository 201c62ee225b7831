"""From a data config to batches: corpus -> tokenizer -> token store -> grain pipeline.

Training draws fixed-length windows of `seq_len + 1` tokens (inputs plus shifted targets) from the
concatenated token stream, shuffled by seed and reshuffled every epoch, through a grain iterator
whose state can be checkpointed. Validation batches are a fixed set of windows spread evenly over
the validation split.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import grain
import numpy as np

from data import corpus
from data.config import DataConfig
from data.errors import DataError
from data.store import TokenStore, build_token_store, default_cache_dir, store_key
from data.tokenizer import Tokenizer, build_tokenizer


@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: Tokenizer
    store: TokenStore
    cfg: DataConfig

    def train_iterator(self, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1):
        """A checkpointable grain iterator of {'tokens': int32 [batch_size, seq_len + 1]}.

        With several shards (processes), each gets batch_size // shard_count rows of every global batch.
        """
        windows = Windows(self.store.train, self.cfg.seq_len)
        ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
        ds = ds.batch(batch_size, batch_fn=stack_windows)
        if shard_count > 1:
            rows = batch_size // shard_count
            ds = ds.map(lambda b: {"tokens": b["tokens"][shard_index * rows : (shard_index + 1) * rows]})
        return iter(ds)

    def validation_batches(self, batch_size: int, num_batches: int) -> list[dict]:
        """`num_batches` fixed batches; windows may overlap when the split is small."""
        tokens, window = self.store.val, self.cfg.seq_len + 1
        starts = np.linspace(0, len(tokens) - window, batch_size * num_batches).round().astype(np.int64)
        rows = np.stack([tokens[s : s + window] for s in starts]).astype(np.int32)
        return [{"tokens": rows[i * batch_size : (i + 1) * batch_size]} for i in range(num_batches)]


class Windows:
    """Random-access source of non-overlapping (but for the one shared target) token windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


def stack_windows(windows) -> dict:
    return {"tokens": np.stack(windows)}


def load(cfg: DataConfig, workdir: pathlib.Path) -> Data:
    """Builds (or opens from cache) everything needed to draw batches; raises DataError on bad input."""
    split = functools.cache(lambda: corpus.split_documents(cfg.corpus, cfg.text_field, cfg.val_fraction))
    tokenizer = build_tokenizer(cfg.tokenizer, workdir, lambda: (d.text for d in split()[0]))
    cache_dir = pathlib.Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    key = store_key(corpus.fingerprint(cfg.corpus, cfg.text_field), tokenizer, cfg.val_fraction)
    store = build_token_store(lambda: split()[0], lambda: split()[1], tokenizer, cache_dir, key)
    for name, tokens in (("training", store.train), ("validation", store.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise DataError(
                f"data.corpus={cfg.corpus!r}: the {name} split has {len(tokens)} tokens, "
                f"shorter than one window of data.seq_len + 1 = {cfg.seq_len + 1}"
            )
    return Data(tokenizer, store, cfg)
