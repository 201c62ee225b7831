"""Chat and preference data (data/formats.py): templates as transformers renders them, loss weights on exactly the
assistant's tokens, packing that changes no conversation's losses, preference rows, bad records, config checks."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from data import formats
from data.chat import CHATML, ChatTemplate
from data.config import DataConfig
from data.errors import DataError
from data.tokenizer import ByteTokenizer
from tests.conftest import tiny_config
from training.config import ConfigError, resolve

# Qwen2-style: a default system message when there is none, ChatML turns.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "That is 20, since 5 * 4 = 20."},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face tokenizer directory: byte-level BPE with ChatML's special tokens and TEMPLATE."""
    import tokenizers

    root = tmp_path_factory.mktemp("hf_tok")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [m["content"] for m in CONVERSATION] * 20 + ["system user assistant You are helpful."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def test_chat_template_renders_and_tokenizes_as_transformers(hf_dir):
    """Our rendering of the directory's template (full conversation, and a prompt with the generation prompt) and
    the conversation's ids equal transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    from data.tokenizer import load_file

    reference = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer = load_file(hf_dir / "tokenizer.json", str(hf_dir / "tokenizer.json"))
    template = formats.template_for(str(hf_dir / "tokenizer.json"), tokenizer)
    assert template.source == TEMPLATE
    for messages, gen in (
        (CONVERSATION, False),
        (CONVERSATION[:3], True),
        ([{"role": "system", "content": "S"}] + CONVERSATION, False),
    ):
        assert template.render(messages, add_generation_prompt=gen) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen
        )
    ids, weights = formats.render_chat({"messages": CONVERSATION}, template, tokenizer)
    expected = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids == list(expected)
    learned = [i for i, w in zip(ids, weights) if w]
    assert reference.decode(learned) == "5<|im_end|>\nThat is 20, since 5 * 4 = 20.<|im_end|>\n"


def test_loss_weights_select_exactly_the_assistant_tokens():
    """ChatML on bytes: the weighted tokens are the assistant's contents and end-of-turn markers (NumPy), the packed
    targets weigh each learned token once; train_on_prompt learns every token after the document start."""
    tokenizer = ByteTokenizer()
    template = ChatTemplate()
    ids, weights = formats.render_chat({"messages": CONVERSATION}, template, tokenizer)
    text = ChatTemplate(CHATML).render(CONVERSATION, add_generation_prompt=False)
    assert ids == [tokenizer.eod_id, *tokenizer.encode(text)]
    w = np.asarray(weights)
    assert tokenizer.decode(np.asarray(ids)[w == 1]) == "5<|im_end|>\nThat is 20, since 5 * 4 = 20.<|im_end|>\n"
    # Spans: every learned token follows "<|im_start|>assistant\n" up to its turn's end.
    starts = [m.end() for m in __import__("re").finditer(r"<\|im_start\|>assistant\n", text)]
    ends = [text.index("<|im_end|>\n", s) + len("<|im_end|>\n") for s in starts]
    expected = np.zeros(len(text) + 1)
    for s, e in zip(starts, ends):
        expected[1 + s : 1 + e] = 1
    np.testing.assert_array_equal(w, expected)

    rows = formats.packed_rows([(ids, weights)], seq_len=len(ids) + 5)
    np.testing.assert_array_equal(rows["loss_weights"][0, : len(ids) - 1], expected[1:])
    assert rows["loss_weights"][0, len(ids) - 1 :].sum() == 0 and rows["segment_ids"][0, len(ids) :].sum() == 0

    _, all_weights = formats.render_chat({"messages": CONVERSATION}, template, tokenizer, train_on_prompt=True)
    assert all(all_weights[1:])


def test_pack_best_fit_decreasing():
    """Every conversation once, no window over capacity, and the bins best fit by decreasing length gives
    (a reference run by hand)."""
    lengths = [7, 3, 5, 2, 6, 4, 1, 8]
    bins = formats.pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # 8 -> new(2 left); 7 -> new(3); 6 -> new(4); 5 -> new(5); 4 -> fits 4 exactly (6+4);
    # 3 -> fits 3 (7+3); 2 -> fits 2 (8+2); 1 -> the 5 window (best fit: 5 left).
    assert bins == [[3, 7], [0, 1], [4, 5], [2, 6]]  # (each window in increasing index order)


def test_packed_conversations_have_the_losses_they_have_alone():
    """A window packing three conversations gives each token the loss it has in a window of its own: attention
    stays inside a conversation and positions restart (the segment ids the packing writes)."""
    from model import Transformer, init_variables
    from training.config import with_vocab
    from training.evaluation import Inputs, cross_entropy

    tokenizer = ByteTokenizer()
    convs = [
        formats.render_chat(
            {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
            ChatTemplate(),
            tokenizer,
        )
        for u, a in (("hi", "hello there"), ("2+2", "4"), ("name?", "jax"))
    ]
    seq_len = sum(len(ids) for ids, _ in convs) + 3
    run = with_vocab(resolve(tiny_config(data={"seq_len": seq_len})), tokenizer.vocab_size)
    model = Transformer(run.model)
    variables = init_variables(model, jax.random.key(1))
    packed = formats.packed_rows(convs, seq_len)
    assert len(packed["tokens"]) == 1 and packed["segment_ids"].max() == 3
    alone = [formats.packed_rows([c], seq_len) for c in convs]
    tokens = np.concatenate([packed["tokens"]] + [a["tokens"] for a in alone])
    segments = np.concatenate([packed["segment_ids"]] + [a["segment_ids"] for a in alone])

    @jax.jit
    def losses(tokens, segments):
        out, targets = Inputs()(tokens, model, variables, segments_BT=segments)
        return cross_entropy(out.logits_BTV, targets)[1]

    nll = np.asarray(losses(tokens, segments))
    start = 0
    for k, (ids, _) in enumerate(convs):
        n = len(ids) - 1
        np.testing.assert_allclose(nll[0, start : start + n], nll[1 + k, :n], rtol=2e-5, atol=2e-5)
        start += len(ids)
    # Without the segment ids the later conversations see the earlier ones: the check above can fail.
    mixed = np.asarray(losses(tokens[:1], np.ones_like(segments[:1])))
    assert not np.allclose(mixed[0, len(convs[0][0]) : len(convs[0][0]) + 5], nll[2, :5], atol=1e-4)


def test_preference_rows_in_both_forms():
    """Standard (strings: responses end with the end-of-document token) and conversational (rendered as the
    template continues the prompt) pairs: the weighted targets are exactly the responses."""
    tokenizer = ByteTokenizer()
    template = ChatTemplate()
    standard = {"prompt": "def add(a, b):", "chosen": " return a + b", "rejected": " return a - b"}
    prompt, chosen, rejected = formats.render_pair(standard, template, tokenizer)
    assert prompt == [tokenizer.eod_id, *tokenizer.encode("def add(a, b):")]
    assert chosen == tokenizer.encode(" return a + b") + [tokenizer.eod_id]
    rows = formats.pair_rows([(prompt, chosen, rejected)], seq_len=40)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        row, w = rows[name][0], rows[f"{name}_weights"][0]
        targets = row[1:]
        np.testing.assert_array_equal(targets[w == 1], response)
        assert w.sum() == len(response)

    conversational = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    prompt, chosen, rejected = formats.render_pair(conversational, template, tokenizer)
    assert tokenizer.decode(prompt) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(chosen) == "4<|im_end|>\n" and tokenizer.decode(rejected) == "5<|im_end|>\n"


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_bad_records_are_counted_and_skipped(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = [
        "{not json",
        {"text": "no messages"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]},
    ]
    corpus = _write(tmp_path / "chat.jsonl", [good] * 10 + bad)
    train, val = formats.load(DataConfig(corpus=str(corpus), format="chat", seq_len=96), ByteTokenizer())
    assert train.records + val.records == 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 6 of 16 records" in err
    assert "line 11: not JSON" in err and "line 12: no 'messages' field" in err and "line 13: no assistant" in err

    only_bad = _write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=r"no usable data.format='chat' record \(line 1: not JSON\)"):
        formats.load(DataConfig(corpus=str(only_bad), format="chat", seq_len=96), ByteTokenizer())
    pairs = _write(
        tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}, {"prompt": "a", "chosen": [], "rejected": "c"}]
    )
    with pytest.raises(DataError, match="line 1: no 'rejected' field"):
        formats.load(DataConfig(corpus=str(pairs), format="preference", seq_len=96), ByteTokenizer())
    capsys.readouterr()


def test_pipeline_draws_packed_windows_and_holds_out_records(tmp_path):
    """Batches of a chat corpus carry the objective's fields; the eval set is the held-out conversations' learned
    targets (mask) with their segment ids."""
    from data import load

    records = [
        {"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]}
        for a in range(12)
        for b in range(10)
    ]
    corpus = _write(tmp_path / "chat.jsonl", records)
    cfg = DataConfig(corpus=str(corpus), format="chat", seq_len=256, val_fraction=0.1)
    data = load(cfg, tmp_path)
    batch = next(data.train_iterator(4, seed=0, fields=("tokens", "loss_weights", "segment_ids")))
    assert batch["tokens"].shape == (4, 257) and batch["loss_weights"].shape == batch["segment_ids"].shape == (4, 256)
    assert batch["segment_ids"].max() >= 3  # several conversations per window
    val = data.validation_batches(4, 1)
    assert set(val[0]) == {"tokens", "mask", "segment_ids"}
    assert 0 < data.splits[1].records < 30 and data.splits[0].records + data.splits[1].records == 120
    with pytest.raises(DataError, match="data.format='chat': gives no 'chosen' field"):
        data.train_iterator(4, seed=0, fields=("chosen",))


@pytest.mark.parametrize(
    "data, train, match",
    [
        ({"format": "dialog"}, {}, "data.format='dialog'"),
        ({"format": "chat"}, {"objective": "lm"}, "train.objective='lm': learns every token"),
        ({"format": "text"}, {"objective": "sft"}, "needs data.document_mask=True"),
        ({"format": "text", "train_on_prompt": True}, {}, "data.train_on_prompt=True: applies to data.format='chat'"),
        (
            {"format": "preference"},
            {"objective": "sft"},
            "reads 'tokens', which data.format='preference' does not give",
        ),
    ],
)
def test_format_and_objective_must_agree(data, train, match):
    with pytest.raises(ConfigError, match=match):
        resolve(tiny_config(data=data, train=train))


def test_posttrain_sets_from_a_corpus(tmp_path):
    """experiments.posttrain build: each function with a docstring gives a doc2code, a code2doc and a nodoc
    conversation and a preference pair whose rejected side is its body's lines permuted (never unchanged); the sets load as their
    formats."""
    from experiments import posttrain

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text(
        'def add(a, b):\n    """Add two numbers.\n\n    More.\n    """\n    c = a\n    d = b\n    return c + d\n\n'
        "def bare(x):\n    y = x\n    z = y\n    return z\n"
    )
    counts = {"doc2code": 1, "code2doc": 1, "nodoc": 1, "prefs": 1}
    assert posttrain.build(tmp_path / "sets", str(corpus), 360) == counts
    code = "def add(a, b):\n    c = a\n    d = b\n    return c + d"
    (doc2code,) = [json.loads(x) for x in (tmp_path / "sets" / "doc2code.jsonl").read_text().splitlines()]
    assert doc2code["messages"][0]["content"] == "Write the function def add(a, b):\nthat does this: Add two numbers."
    assert doc2code["messages"][1]["content"] == code
    (nodoc,) = [json.loads(x) for x in (tmp_path / "sets" / "nodoc.jsonl").read_text().splitlines()]
    source = 'def add(a, b):\n    """Add two numbers."""\n    c = a\n    d = b\n    return c + d'
    assert nodoc["messages"][0]["content"] == f"Remove the docstring from this function:\n{source}"
    assert nodoc["messages"][1]["content"] == code
    (pair,) = [json.loads(x) for x in (tmp_path / "sets" / "prefs.jsonl").read_text().splitlines()]
    rejected = pair["rejected"][0]["content"]
    assert rejected != code and sorted(rejected.splitlines()) == sorted(code.splitlines())
    assert rejected.splitlines()[0] == "def add(a, b):"
    rng = __import__("random").Random(1)
    assert all(posttrain.corrupted("def f():\n    a\n    b", rng) == "def f():\n    b\n    a" for _ in range(5))


def test_posttrain_subset_keeps_every_held_out_record(tmp_path):
    """experiments.posttrain subset: N of the training records and exactly the held-out ones, each on its side of
    the split again when the reader splits the new file; a count out of range, or an existing file without
    overwrite, is a one-line error."""
    from data.corpus import is_validation
    from experiments import posttrain

    source = tmp_path / "set.jsonl"
    source.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(80)))

    def split(path):
        held, train = set(), set()
        for name, _, value in formats.records(str(path)):
            (held if is_validation(name, 0.25) else train).add(value["n"])
        return held, train

    held, train = split(source)
    assert len(held) > 10 and len(train) > 40  # both sides of this split have records to lose
    assert posttrain.subset(str(source), 12, str(tmp_path / "small.jsonl"), 0.25, seed=3)["held_out"] == len(held)
    small_held, small_train = split(tmp_path / "small.jsonl")
    assert small_held == held
    assert len(small_train) == 12 and small_train < train
    with pytest.raises(DataError, match="--records=81: between 1 and the"):
        posttrain.subset(str(source), 81, str(tmp_path / "big.jsonl"), 0.25)
    kept = (tmp_path / "small.jsonl").read_text()
    with pytest.raises(DataError, match="exists .pass --overwrite"):
        posttrain.subset(str(source), 5, str(tmp_path / "small.jsonl"), 0.25)
    assert (tmp_path / "small.jsonl").read_text() == kept


def test_posttrain_mix_replays_only_training_records_and_keeps_the_held_out_ones(tmp_path):
    """experiments.posttrain mix: the new file's training side holds the set's and the replay set's training
    records, each once, evenly interleaved; its held-out side exactly the set's held-out records (none of the
    replay's); --replay equal to --out is a one-line error."""
    from data.corpus import is_validation
    from experiments import posttrain

    def write(name, tag, n):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"tag": tag, "n": i}) + "\n" for i in range(n)))
        return path

    skill, replay = write("skill.jsonl", "s", 90), write("replay.jsonl", "r", 30)

    def sides(path):
        held, train = [], []
        for name, _, value in formats.records(str(path)):
            (held if is_validation(name, 0.25) else train).append((value["tag"], value["n"]))
        return held, train

    skill_held, skill_train = sides(skill)
    replay_held, replay_train = sides(replay)
    assert skill_held and replay_held  # records the mix must place on the held-out side, and leave out
    counts = posttrain.mix(str(skill), str(replay), str(tmp_path / "mix.jsonl"), 0.25)
    assert counts["train"] == len(skill_train) and counts["replay"] == len(replay_train)
    held, train = sides(tmp_path / "mix.jsonl")
    assert held == skill_held
    assert sorted(train) == sorted(skill_train + replay_train)
    assert [x for x in train if x[0] == "s"] == skill_train  # each set's order kept
    # evenly spread: every quarter of the training side holds about a quarter of the replay records
    quarters = [sum(tag == "r" for tag, _ in train[i * len(train) // 4 : (i + 1) * len(train) // 4]) for i in range(4)]
    assert max(quarters) - min(quarters) <= 1, quarters
    with pytest.raises(DataError, match="--replay=.*other than --out"):
        posttrain.mix(str(skill), str(tmp_path / "mix.jsonl"), str(tmp_path / "mix.jsonl"), 0.25, overwrite=True)


def test_an_sft_run_resumes_bit_identically(tmp_path, monkeypatch):
    """Stopped at step 2 and resumed, an SFT run on packed conversations logs the losses of an uninterrupted one:
    the row stream of a chat corpus resumes where it was, as the text windows' does."""
    from training import loop
    from training.loop import train

    monkeypatch.setattr(loop, "peak_flops", lambda *args: (1e12, "not measured"))
    records = [
        {"messages": [{"role": "user", "content": f"{a}*{b}"}, {"role": "assistant", "content": str(a * b)}]}
        for a in range(9)
        for b in range(9)
    ]
    corpus = _write(tmp_path / "chat.jsonl", records)
    groups = {
        "data": {"corpus": str(corpus), "format": "chat", "seq_len": 128, "val_fraction": 0.1},
        "train": {"objective": "sft", "schedule": "constant", "log_every": 1, "eval_every": 2},
        "checkpoint": {"every": 2},
    }

    def run(workdir, steps):
        train(resolve(tiny_config(**groups | {"train": {**groups["train"], "steps": steps}})), workdir)
        rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train/loss"), r.get("eval/loss")) for r in rows]

    reference = run(tmp_path / "reference", 4)
    run(tmp_path / "resumed", 2)
    assert run(tmp_path / "resumed", 4) == reference
    assert len({loss for _, loss, _ in reference if loss is not None}) == 4
