"""Corpus splitting, tokenizers, the cached token store, the grain pipeline and bad data input."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from data import DataConfig, DataError, load, scoring_batches
from data.corpus import split_documents
from data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe


def test_split_is_deterministic_and_disjoint(text_corpus):
    train1, val1 = split_documents(str(text_corpus), "text", 0.2)
    train2, val2 = split_documents(str(text_corpus), "text", 0.2)
    assert [d.name for d in train1] == [d.name for d in train2] and [d.name for d in val1] == [d.name for d in val2]
    assert val1 and train1 and not {d.name for d in train1} & {d.name for d in val1}
    assert len(train1) + len(val1) == 12


def test_stdlib_corpus_is_the_interpreters_python_sources():
    train, val = split_documents("stdlib", "text", 0.02)
    names = {d.name for d in train + val}
    assert "os.py" in names and "json/__init__.py" in names
    assert not any("site-packages" in n for n in names)
    assert 0 < len(val) < 0.05 * len(train)


def test_byte_tokenizer_round_trips_and_counts_bytes():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo'\n"
    ids = tok.encode(text)
    assert tok.decode(ids + [tok.eod_id]) == text
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8")) and tok.token_bytes[tok.eod_id] == 0


def test_the_byte_tokenizer_as_a_tokenizers_tokenizer_is_the_same_tokenizer():
    """What a Hugging Face export writes as tokenizer.json for `bytes`, read back as any tokenizer.json is (an import
    of the export, infer.py --hf_dir), encodes, decodes and counts bytes as ByteTokenizer does."""
    ours = ByteTokenizer()
    theirs = HFTokenizer(ours.to_tokenizers(), "exported")
    text = "".join(map(chr, range(1, 128))) + " héllo, 日本 🙂\n\r\t\x00"
    assert theirs.encode(text) == ours.encode(text) and theirs.decode(ours.encode(text)) == text
    assert (theirs.vocab_size, theirs.eod_id, theirs.document_start) == (257, 256, [256])
    np.testing.assert_array_equal(theirs.token_bytes, ours.token_bytes)


def test_bpe_token_bytes_sum_to_the_utf8_length():
    texts = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "naïve café ünïcode\n"] * 50
    tok = HFTokenizer(train_bpe(texts, 300), "bpe:300")
    assert tok.vocab_size == 300
    for text in texts[:2]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert len(tok.encode(texts[0])) < len(texts[0])  # it merged something


def test_store_is_cached_and_windows_are_shuffled_deterministically(text_corpus, tmp_path):
    cfg = DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    data = load(cfg, tmp_path / "wd")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load(cfg, tmp_path / "wd")
    assert again.store.path == data.store.path
    # The stream is the training documents joined by end-of-document ids.
    assert (
        data.store.meta["train"]["tokens"] == data.store.meta["train"]["bytes"] + data.store.meta["train"]["documents"]
    )
    assert np.sum(np.asarray(data.store.train) == data.tokenizer.eod_id) == data.store.meta["train"]["documents"]

    it1, it2 = data.train_iterator(4, seed=1), data.train_iterator(4, seed=1)
    batches = [next(it1)["tokens"] for _ in range(3)]
    for b in batches:
        np.testing.assert_array_equal(b, next(it2)["tokens"])
        assert b.shape == (4, 17) and b.dtype == np.int32
    assert not np.array_equal(next(data.train_iterator(4, seed=2))["tokens"], batches[0])
    # Every window is a contiguous slice of the stream, inputs and targets shifted by one.
    stream = np.asarray(data.store.train)
    row = batches[0][0]
    starts = [s for s in range(0, len(stream) - 16, 16) if np.array_equal(stream[s : s + 17], row)]
    assert starts


def test_iterator_state_restores_the_exact_continuation(text_corpus, tmp_path):
    data = load(DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path)), tmp_path)
    it = data.train_iterator(2, seed=0)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(3)]
    fresh = data.train_iterator(2, seed=0)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["tokens"], want)


def test_batches_carry_the_fields_an_objective_asks_for(text_corpus, tmp_path):
    """loss_weights of ones per target and the segment_ids model.mask.documents finds in the inputs, which give the
    model the positions the end-of-document path does; the tokens as without them."""
    import jax.numpy as jnp

    from model.mask import documents
    from training.evaluation import segment_positions

    data = load(DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path)), tmp_path)
    fields = ("tokens", "loss_weights", "segment_ids")
    rows = len(data.store.train) // 16  # one batch: the whole epoch, so some windows cross documents
    batch = next(data.train_iterator(rows, seed=0, fields=fields))
    np.testing.assert_array_equal(batch["tokens"], next(data.train_iterator(rows, seed=0))["tokens"])
    assert batch["loss_weights"].shape == (rows, 16) and (batch["loss_weights"] == 1).all()
    segments, positions = documents(jnp.asarray(batch["tokens"][:, :16]), data.tokenizer.eod_id)
    np.testing.assert_array_equal(batch["segment_ids"], segments)
    assert batch["segment_ids"].dtype == np.int32 and batch["segment_ids"].max() > 0
    np.testing.assert_array_equal(segment_positions(jnp.asarray(batch["segment_ids"])), positions)
    with pytest.raises(DataError, match=r"gives no 'chosen' field \(its batches carry tokens, loss_weights"):
        data.train_iterator(8, seed=0, fields=("tokens", "chosen"))


def test_validation_batches_are_fixed_and_do_not_depend_on_the_batch_size(text_corpus, tmp_path):
    data = load(DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path)), tmp_path)
    val = np.asarray(data.store.val)
    eval_sets = []
    for batch_size in (4, 8, 5, 4):
        batches = data.validation_batches(batch_size, 3)
        assert all(b["tokens"].shape == (batch_size, 17) for b in batches)
        tokens = np.concatenate([b["tokens"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert set(mask.sum(1)) <= {0.0, 16.0}  # whole windows, padding rows fully masked out
        eval_sets.append(tokens[mask.sum(1) > 0])
    # 3 eval batches are 3 * 16 windows, whatever the batch size: the same windows in the same order.
    assert len(eval_sets[0]) == 48 and len(val) > 48 * 16
    for rows in eval_sets[1:]:
        np.testing.assert_array_equal(rows, eval_sets[0])
    for row in eval_sets[0]:  # each a contiguous slice of the validation stream
        assert any(np.array_equal(val[s : s + 17], row) for s in range(len(val) - 16))


def test_a_stream_position_counts_windows_not_batches(text_corpus, tmp_path):
    data = load(DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path)), tmp_path)
    pairs = data.train_iterator(2, seed=3)
    stream = np.concatenate([next(pairs)["tokens"] for _ in range(20)])  # the stream, two windows at a time
    for batch_size, start in [(4, 0), (8, 12), (3, 13), (6, 0)]:
        it = data.train_iterator(batch_size, seed=3, start_window=start)
        got = np.concatenate([next(it)["tokens"] for _ in range(3)])
        np.testing.assert_array_equal(got, stream[start : start + 3 * batch_size])


def test_jsonl_and_glob_corpora(tmp_path):
    lines = [json.dumps({"text": f"print({i})\n" * 20}) for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    data = load(
        DataConfig(corpus=str(tmp_path / "docs.jsonl"), seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "c")),
        tmp_path,
    )
    assert data.store.meta["train"]["documents"] + data.store.meta["val"]["documents"] == 20
    for i in range(4):
        (tmp_path / f"t{i}.txt").write_text("hello world\n" * 10)
    data = load(
        DataConfig(corpus=str(tmp_path / "t*.txt"), seq_len=8, val_fraction=0.3, cache_dir=str(tmp_path / "c")),
        tmp_path,
    )
    assert data.store.meta["train"]["documents"] + data.store.meta["val"]["documents"] == 4


def test_bpe_tokenizer_is_trained_once_and_cached_in_the_workdir(text_corpus, tmp_path):
    cfg = DataConfig(
        corpus=str(text_corpus), tokenizer="bpe:300", seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "c")
    )
    data = load(cfg, tmp_path / "wd")
    cached = tmp_path / "wd" / "tokenizer.json"
    assert cached.exists() and data.tokenizer.vocab_size == 300
    mtime = cached.stat().st_mtime_ns
    assert load(cfg, tmp_path / "wd").tokenizer.fingerprint == data.tokenizer.fingerprint
    assert cached.stat().st_mtime_ns == mtime
    # A tokenizer.json path works as a spec too.
    assert load(DataConfig(**{**cfg.__dict__, "tokenizer": str(cached)}), tmp_path / "wd2").tokenizer.vocab_size == 300


@pytest.mark.parametrize(
    "setup, spec_field, match",
    [
        (lambda p: None, {"corpus": "{p}/missing"}, "no such file"),
        (lambda p: (p / "empty").mkdir(), {"corpus": "{p}/empty"}, "empty"),
        (lambda p: (p / "g").mkdir(), {"corpus": "{p}/g/*.txt"}, "matches no files"),
        (
            lambda p: [(p / f"s{i}.txt").write_text("x = 1\n") for i in range(3)],
            {"corpus": "{p}/s*.txt"},
            "shorter than one window",
        ),
        (lambda p: (p / "bad.json").write_text("{not json"), {"tokenizer": "{p}/bad.json"}, "cannot read"),
        (lambda p: None, {"tokenizer": "bpe:12"}, "bpe:N"),
        (lambda p: None, {"tokenizer": "{p}/nope.json"}, "not 'bytes'"),
    ],
)
def test_bad_data_input_gives_a_one_line_error_naming_it(tmp_path, text_corpus, setup, spec_field, match):
    setup(tmp_path)
    fields = {"corpus": str(text_corpus), "seq_len": 64, "cache_dir": str(tmp_path / "cache")}
    fields.update({k: v.format(p=tmp_path) for k, v in spec_field.items()})
    with pytest.raises(DataError, match=match) as err:
        load(DataConfig(**fields), tmp_path / "wd")
    message = str(err.value)
    assert "\n" not in message and any(str(v).format(p=tmp_path) in message for v in fields.values())
    assert not list(pathlib.Path(tmp_path / "cache").glob(".*"))  # no half-written store left behind


def overwrite(file: pathlib.Path, offset: int, data: bytes) -> None:
    with file.open("r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "train.bin").write_bytes((p / "train.bin").read_bytes()[:1000]),  # truncated
        lambda p: (p / "val.bin").write_bytes(b""),  # emptied
        lambda p: (p / "val.bin").unlink(),
        lambda p: (p / "meta.json").write_text((p / "meta.json").read_text().replace('"tokens": ', '"tokens": 1')),
        lambda p: (p / "meta.json").write_text("{"),
        lambda p: overwrite(p / "train.bin", 1000, b"\xff\xff"),  # same length, an id no tokenizer of it has
        lambda p: overwrite(p / "val.bin", 10, b"d\x00"),  # same length, a valid id: only the checksum sees it
    ],
)
def test_a_damaged_token_store_is_rebuilt_never_used(text_corpus, tmp_path, capsys, damage):
    cfg = DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    store = load(cfg, tmp_path / "wd").store
    train, val, meta = np.array(store.train), np.array(store.val), dict(store.meta)
    # The stream is the training documents, each followed by the end-of-document id (256), as bytes.
    docs, _ = split_documents(str(text_corpus), "text", 0.2)
    expected = np.concatenate([np.frombuffer(d.text.encode() + b"\0", np.uint8).astype(np.int64) for d in docs])
    expected[np.cumsum([len(d.text.encode()) + 1 for d in docs]) - 1] = 256
    np.testing.assert_array_equal(train, expected)
    assert capsys.readouterr().err == ""
    damage(store.path)
    again = load(cfg, tmp_path / "wd").store
    err = capsys.readouterr().err
    assert err.startswith(f"warning: token store {store.path} is damaged (") and err.count("\n") == 1
    assert again.path == store.path and again.meta == meta
    np.testing.assert_array_equal(again.train, train)
    np.testing.assert_array_equal(again.val, val)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [store.path.name]  # nothing left aside
    load(cfg, tmp_path / "wd")
    assert capsys.readouterr().err == ""  # the rebuilt store is used as it is


def test_a_store_with_ids_outside_the_vocabulary_is_refused_and_one_that_stays_so_is_an_error(tmp_path, text_corpus):
    from data.store import build_token_store, mismatch

    cfg = DataConfig(corpus=str(text_corpus), seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    store = load(cfg, tmp_path / "wd").store
    assert mismatch(store.path, 257) is None
    assert mismatch(store.path, 200) == "train.bin holds token id 256, outside the tokenizer's 200 ids"

    class Overflowing(ByteTokenizer):  # a tokenizer that gives an id past its vocabulary: rebuilding cannot help
        vocab_size = 100

    docs, _ = split_documents(str(text_corpus), "text", 0.2)
    with pytest.raises(DataError, match=r"is not usable as soon as it is built \(train.bin holds token id 256,"):
        build_token_store(lambda: docs, lambda: docs, Overflowing(), tmp_path / "cache2", "key")


@pytest.mark.parametrize("num_tokens", [5, 17, 33, 40])
def test_scoring_batches_score_every_target_exactly_once(num_tokens):
    tokens = np.arange(100, 100 + num_tokens, dtype=np.int32)
    batches = scoring_batches(tokens, seq_len=8, batch_size=3)
    scored = []
    for batch in batches:
        assert batch["tokens"].shape == (3, 9) and batch["mask"].shape == (3, 8)
        targets = batch["tokens"][:, 1:]
        scored += targets[batch["mask"] == 1].tolist()
    assert sorted(scored) == tokens[1:].tolist()
    # each scored target follows its true predecessor in the window
    for batch in batches:
        rows, cols = np.nonzero(batch["mask"])
        assert (batch["tokens"][rows, cols] == batch["tokens"][rows, cols + 1] - 1).all()
