"""From a data config to batches: corpus -> tokenizer -> token store -> grain pipeline.

Training draws fixed-length windows of `seq_len + 1` tokens (inputs plus shifted targets) from the
concatenated token stream, shuffled by seed and reshuffled every epoch, through a grain iterator
whose position (in windows) is checkpointed; each batch carries the fields the train objective asks for
(data.config.BATCH_FIELDS), all computed from its windows. Validation batches are a fixed set of windows spread evenly
over the validation split, the same for any batch size.

Chat and preference corpora (data.format, data/formats.py) give their rows instead of windows of the token stream:
packed conversations or preference pairs, drawn the same way (shuffled by seed, reshuffled every epoch, positions
counted in rows).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import grain
import numpy as np

from data import corpus
from data.config import FORMAT_FIELDS, DataConfig
from data.errors import DataError
from data.store import TokenStore, build_token_store, default_cache_dir, store_key
from data.tokenizer import Tokenizer, build_tokenizer

# Windows per `train.eval_batches`: the eval set's size is fixed by the config, not by train.batch_size
# (16 is the default batch size, so default runs keep the eval set they always had).
EVAL_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: Tokenizer
    store: TokenStore | None  # format 'text'
    cfg: DataConfig
    splits: tuple | None = None  # formats 'chat', 'preference': (train, validation) data.formats.Split

    def train_iterator(
        self,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
        start_window: int = 0,
        extra_tokens: int = 0,
        fields: tuple[str, ...] = ("tokens",),
    ):
        """A checkpointable grain iterator of {'tokens': int32 [batch_size // shard_count, seq_len + 1 + extra]}
        (`extra_tokens`: the further targets multi-token prediction heads need; windows still start every
        seq_len tokens), plus the other `fields` (`stack_windows`).

        The stream is one fixed sequence of windows per seed (shuffled, reshuffled every epoch); the iterator
        starts at its window `start_window` and cuts it into global batches of `batch_size`, so a run resumed
        with another batch size continues exactly where it was (a position counts windows, not batches).
        The global batches are the same for any shard_count: shard i (a process) reads only rows
        [i * rows, (i + 1) * rows) of each, rows = batch_size // shard_count, so a run gives the same
        losses on one host or several, and resumes on any number of hosts.
        """
        given = FORMAT_FIELDS[self.cfg.format]
        if unknown := [f for f in fields if f not in given]:
            raise DataError(
                f"data.format={self.cfg.format!r}: gives no {unknown[0]!r} field (its batches carry {', '.join(given)})"
            )
        if self.splits is not None:
            if extra_tokens:
                raise DataError(f"data.format={self.cfg.format!r}: has no further targets for multi-token heads")
            source, batch_fn = Rows(self.splits[0].rows, fields), stack_rows
        else:
            source = Windows(self.store.train, self.cfg.seq_len, extra_tokens)
            batch_fn = functools.partial(
                stack_windows, fields=fields, seq_len=self.cfg.seq_len, eod_id=self.tokenizer.eod_id
            )
        ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        if start_window:
            ds = ds[start_window:]
        # Global batch k is local batches k * shard_count .. k * shard_count + shard_count - 1, in shard order.
        ds = ds.batch(batch_size // shard_count, batch_fn=batch_fn)[shard_index::shard_count]
        return iter(ds)

    def validation_batches(self, batch_size: int, num_batches: int) -> list[dict]:
        """The fixed eval set, cut into batches of {'tokens', 'mask'} of `batch_size` rows (the last one padded
        with mask 0), so it does not depend on the batch size: every target of the split exactly once when
        that takes at most `num_batches * EVAL_ROWS` windows (the numbers `infer.py --score` gives for the
        same text), else that many windows spread evenly over the split."""
        if self.splits is not None:
            return record_batches(self.splits[1].rows, batch_size, num_batches * EVAL_ROWS)
        tokens, seq_len, count = self.store.val, self.cfg.seq_len, num_batches * EVAL_ROWS
        if len(covering_starts(len(tokens), seq_len)) <= count:
            return scoring_batches(tokens, seq_len, batch_size)
        starts = np.linspace(0, len(tokens) - seq_len - 1, count).round().astype(np.int64)
        rows = np.zeros((-(-count // batch_size) * batch_size, seq_len + 1), np.int32)
        rows[:count] = np.stack([tokens[s : s + seq_len + 1] for s in starts])
        mask = np.zeros((len(rows), seq_len), np.float32)
        mask[:count] = 1.0
        return [_rows(rows, mask, i, batch_size) for i in range(0, len(rows), batch_size)]


class Windows:
    """Random-access source of token windows starting every seq_len tokens, each seq_len + 1 + `extra` long:
    non-overlapping but for the targets they share with the next window."""

    def __init__(self, tokens: np.ndarray, seq_len: int, extra: int = 0):
        self.tokens, self.seq_len, self.extra = tokens, seq_len, extra

    def __len__(self) -> int:
        return (len(self.tokens) - 1 - self.extra) // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1 + self.extra], dtype=np.int32)


class Rows:
    """Random-access source of a split's rows ({field: row}) of the `fields` asked for."""

    def __init__(self, rows: dict[str, np.ndarray], fields: tuple[str, ...]):
        self.rows = {f: rows[f] for f in fields}

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def __getitem__(self, i: int) -> dict:
        return {f: r[i] for f, r in self.rows.items()}


def stack_rows(rows: list[dict]) -> dict:
    return {f: np.stack([r[f] for r in rows]) for f in rows[0]}


# The rows scored as a chat or preference corpus's held-out loss: the token windows and their learned targets.
EVAL_FIELDS = {"tokens": ("tokens", "loss_weights"), "chosen": ("chosen", "chosen_weights")}


def record_batches(rows: dict[str, np.ndarray], batch_size: int, count: int) -> list[dict]:
    """The fixed eval set of a chat or preference split: {'tokens', 'mask'} (+ 'segment_ids' of packed
    conversations) of at most `count` rows spread evenly over it (the chosen responses of preference pairs), the last
    batch padded with mask 0."""
    tokens_key, mask_key = EVAL_FIELDS["tokens" if "tokens" in rows else "chosen"]
    n = len(rows[tokens_key])
    picked = np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))
    padded = -(-len(picked) // batch_size) * batch_size
    out = {"tokens": rows[tokens_key][picked], "mask": rows[mask_key][picked]}
    if "segment_ids" in rows:
        out["segment_ids"] = rows["segment_ids"][picked]
    out = {k: np.concatenate([v, np.zeros((padded - len(v), *v.shape[1:]), v.dtype)]) for k, v in out.items()}
    return [{k: v[i : i + batch_size] for k, v in out.items()} for i in range(0, padded, batch_size)]


def covering_starts(num_tokens: int, seq_len: int) -> list[int]:
    """Window starts that put every target (tokens 1..N-1) in some window: stride seq_len, the last
    window moved back to end at the last token."""
    count = max(1, -(-(num_tokens - 1) // seq_len))
    return [min(w * seq_len, max(num_tokens - seq_len - 1, 0)) for w in range(count)]


def scoring_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> list[dict]:
    """Batches of {'tokens': [B, seq_len + 1], 'mask': [B, seq_len]} in which every target of `tokens`
    has mask 1 exactly once; padding (a short text, the last batch's spare rows) has mask 0."""
    starts = covering_starts(len(tokens), seq_len)
    rows = np.zeros((-(-len(starts) // batch_size) * batch_size, seq_len + 1), np.int32)
    mask = np.zeros((len(rows), seq_len), np.float32)
    for w, start in enumerate(starts):
        window = np.asarray(tokens[start : start + seq_len + 1])
        rows[w, : len(window)] = window
        first_new = w * seq_len - start  # targets before this were scored by the previous window
        mask[w, first_new : len(window) - 1] = 1.0
    return [_rows(rows, mask, i, batch_size) for i in range(0, len(rows), batch_size)]


def _rows(rows: np.ndarray, mask: np.ndarray, start: int, count: int) -> dict:
    return {"tokens": rows[start : start + count], "mask": mask[start : start + count]}


def stack_windows(windows, fields: tuple[str, ...] = ("tokens",), seq_len: int = 0, eod_id: int = 0) -> dict:
    """A batch of the windows with `fields`: a pretraining stream weighs every target 1 (loss_weights), and its
    segment_ids are the documents that model.mask.documents finds in the inputs (a new one at every `eod_id`)."""
    tokens = np.stack(windows)
    batch = {"tokens": tokens}
    if "loss_weights" in fields:
        batch["loss_weights"] = np.ones((len(tokens), seq_len), np.float32)
    if "segment_ids" in fields:
        batch["segment_ids"] = np.cumsum(tokens[:, :seq_len] == eod_id, axis=1, dtype=np.int32)
    return batch


def windows(tokens: np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """int32 [count, seq_len] windows of a token stream spread evenly over it (count None: as many as cover it,
    stride seq_len, the last one ending at its end); a stream no longer than seq_len is one window."""
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) <= seq_len:
        return tokens[None]
    count = -(-len(tokens) // seq_len) if count is None else count
    starts = np.linspace(0, len(tokens) - seq_len, count).round().astype(np.int64)
    return np.stack([tokens[s : s + seq_len] for s in starts])


def calibration_windows(cfg: DataConfig, tokenizer: Tokenizer, count: int, text: str | None = None) -> np.ndarray:
    """Windows [count, seq_len] of the training split, spread evenly over it, tokenized with `tokenizer` (a
    run's, from its checkpoint); or every window of `text` (one document) when given: what post-training
    quantization calibrates on (model/quant/calibrate.py)."""
    if text is not None:
        return windows(np.asarray(tokenizer.encode(text) + [tokenizer.eod_id]), cfg.seq_len)
    return windows(token_store(cfg, tokenizer).train, cfg.seq_len, count)


def token_store(cfg: DataConfig, tokenizer: Tokenizer, split=None) -> TokenStore:
    """The corpus's token store under `tokenizer` (built once, then opened from the cache)."""
    split = split or functools.cache(lambda: corpus.split_documents(cfg.corpus, cfg.text_field, cfg.val_fraction))
    cache_dir = pathlib.Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    key = store_key(corpus.fingerprint(cfg.corpus, cfg.text_field), tokenizer, cfg.val_fraction)
    return build_token_store(lambda: split()[0], lambda: split()[1], tokenizer, cache_dir, key)


def load(cfg: DataConfig, workdir: pathlib.Path) -> Data:
    """Builds (or opens from cache) everything needed to draw batches; raises DataError on bad input."""
    if cfg.format != "text":
        from data import formats

        records = functools.cache(lambda: list(formats.records(cfg.corpus)))
        tokenizer = build_tokenizer(cfg.tokenizer, workdir, lambda: formats.texts(records()))
        return Data(tokenizer, None, cfg, formats.load(cfg, tokenizer, records()))
    split = functools.cache(lambda: corpus.split_documents(cfg.corpus, cfg.text_field, cfg.val_fraction))
    tokenizer = build_tokenizer(cfg.tokenizer, workdir, lambda: (d.text for d in split()[0]))
    store = token_store(cfg, tokenizer, split)
    for name, tokens in (("training", store.train), ("validation", store.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise DataError(
                f"data.corpus={cfg.corpus!r}: the {name} split has {len(tokens)} tokens, "
                f"shorter than one window of data.seq_len + 1 = {cfg.seq_len + 1}"
            )
    return Data(tokenizer, store, cfg)
