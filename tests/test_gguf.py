"""GGUF export (model/gguf, `python -m model.gguf export`): read back with the `gguf` package (names, shapes, types,
metadata, values within each type's rounding, the tokenizer), bad input refused in one line before anything is
written, and, where a Python with llama-cpp-python is found ($LLAMA_CPP_PYTHON, or this one), run by llama.cpp
itself: its logits, greedy tokens and tokenization against ours."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import gguf
import jax
import numpy as np
import pytest

import model
from model.config import ModelConfig
from model.gguf import GGUFError, tensors_for_gguf, write
from model.gguf.llama_cpp_side import llama_cpp, python_with_llama_cpp
from model.rope import RopeScaling

LLAMA3 = RopeScaling(type="llama3", factor=8.0, original_max_len=16)  # scaled: positions past 16 see it
TINY = dict(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96, max_seq_len=128,
            init_std=0.15, norm_eps=1e-5, tie_embeddings=False, scan_layers=False)  # fmt: skip
FAMILIES = {
    "llama_gqa_llama3_untied": dict(rope_theta=50_000.0, rope_scaling=LLAMA3),
    "llama_mqa_tied_linear": dict(num_kv_heads=1, tie_embeddings=True, rope_scaling=RopeScaling("linear", 2.0)),
    "qwen3": dict(qk_norm=True, head_dim=24),
    "mistral": dict(sliding_window=128),  # reaches past the context: llama.cpp's llama needs no window
}
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def random_model(**overrides) -> tuple[ModelConfig, dict]:
    """A tiny model with large random weights (logits far from uniform) and norm scales away from 1."""
    cfg = ModelConfig(**(TINY | overrides))
    params = nn.unbox(jax.jit(lambda k: model.init_variables(model.Transformer(cfg), k))(jax.random.key(0)))["params"]
    rng = np.random.default_rng(0)

    def norms_moved(path, x):
        scale = (1 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        return scale if "norm" in jax.tree_util.keystr(path) else np.asarray(x)

    return cfg, jax.tree_util.tree_map_with_path(norms_moved, params)


def bpe_tokenizer(pre: str = "gpt-2"):
    """A small `bpe:N`-style tokenizer (GPT-2's regex), or (pre="llama-bpe") one split as a Llama 3 tokenizer.json
    does (its regex, then byte-level, whole-word tokens kept)."""
    import tokenizers
    from tokenizers import pre_tokenizers

    from data.tokenizer import EOD, HFTokenizer, train_bpe
    from model.gguf.vocab import LLAMA3_REGEX

    texts = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "héllo wörld 日本 1234567 " * 20]
    if pre == "gpt-2":
        return HFTokenizer(train_bpe(texts * 10, 280), "bpe:280")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
    split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3_REGEX), behavior="isolated", invert=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=[EOD], initial_alphabet=alphabet)
    tok.train_from_iterator(texts * 10, trainer=trainer)
    return HFTokenizer(tok, "llama3-style")


def fields(path) -> tuple[dict, dict]:
    """(metadata by key, tensors by name) of a GGUF file, as the gguf package reads it."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def untrained_workdir(directory, tokenizer, **model_overrides):
    from tests.conftest import untrained_workdir as workdir

    return workdir(directory, tokenizer, model_overrides)


def export(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python -m model.gguf export ...` (in this process)."""
    from model.gguf.__main__ import main

    try:
        main(["export", *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# -- read back with the gguf package ---------------------------------------------------------------------------------


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0", "q4_0"])
def test_the_file_reads_back_with_each_tensor_within_its_types_rounding(type, tmp_path):
    """Names, shapes, types and metadata as llama.cpp reads them; each tensor dequantizes to ours rounded by its type:
    f16 is the float16 cast, q8_0/q4_0 exactly gguf's quantize-then-dequantize of ours, within a block's step of it.
    d_ff=80: ffn_down's rows (80 long) do not split into 32-blocks and stay f16."""
    cfg, params = random_model(d_ff=80, rope_theta=50_000.0, rope_scaling=LLAMA3)
    tok = bpe_tokenizer()
    types = write(cfg, params, tok.to_tokenizers(), SPECIAL, tmp_path / "m.gguf", type)
    meta, tensors = fields(tmp_path / "m.gguf")
    ours = tensors_for_gguf(cfg, params)

    matrix = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[type]
    names = {"token_embd", "output_norm", "output", "rope_freqs"}
    names |= {f"blk.{i}.{n}" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")}
    names |= {f"blk.{i}.{n}" for i in range(2) for n in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == set(ours) == {n + ".weight" for n in names}
    for name, t in tensors.items():
        x = ours[name]
        assert tuple(t.shape[::-1]) == x.shape  # ggml lists the row length first
        want = "F32" if x.ndim == 1 else ("F16" if name.endswith("ffn_down.weight") and type != "f32" else matrix)
        assert t.tensor_type.name == want == types[name].name, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape)
        if want in ("F32", "F16"):
            np.testing.assert_array_equal(got, x.astype(np.float16 if want == "F16" else np.float32).astype(np.float32))
        else:
            np.testing.assert_array_equal(
                got, gguf.quants.dequantize(gguf.quants.quantize(x, t.tensor_type), t.tensor_type)
            )
            blocks = np.abs(x.reshape(-1, 32)).max(-1, keepdims=True)
            step = blocks / (127 if want == "Q8_0" else 8)  # q4_0 clips its top value: up to one step off
            assert np.all(np.abs(got.reshape(-1, 32) - x.reshape(-1, 32)) <= step * 1.01)
    assert tensors["token_embd.weight"].data.shape[0] == cfg.vocab_size

    expected = {
        "general.architecture": "llama",
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 50_000.0,
        "llama.vocab_size": 300,
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[type],
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    # llama3: plain RoPE's frequencies divided by rope_freqs are ours.
    plain = 1 / 50_000.0 ** (np.arange(0, 16, 2) / 16)
    freqs = np.asarray(model.rope.inverse_frequencies(16, 50_000.0, LLAMA3))
    np.testing.assert_allclose(plain / ours["rope_freqs.weight"], freqs, rtol=1e-6)


def test_the_tokenizer_is_llama_cpps_gpt2_vocabulary(tmp_path):
    """Tokens by id (padded with unused ones up to the embedding's rows), their types, the ranked merges, the 'gpt-2'
    pre-tokenizer, and bos = eos = pad = end of document with bos added (our models condition on it first)."""
    tok = bpe_tokenizer()
    cfg, params = random_model()
    write(cfg, params, tok.to_tokenizers(), SPECIAL, tmp_path / "m.gguf", "f16")
    meta, _ = fields(tmp_path / "m.gguf")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size > tok.vocab_size
    assert tokens[: tok.vocab_size] == sorted(vocab, key=vocab.get)
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    assert types[tok.eod_id] == gguf.TokenType.CONTROL and tokens[tok.eod_id] == "<|endoftext|>"
    assert set(types[: tok.vocab_size]) - {types[tok.eod_id]} == {gguf.TokenType.NORMAL}
    assert set(types[tok.vocab_size :]) == {gguf.TokenType.UNUSED}
    merges = json.loads(tok.tok.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    special = ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token", "add_eos_token")
    assert [meta[f"tokenizer.ggml.{k}"] for k in special] == [0, 0, 0, True, False]


def test_the_byte_tokenizer_is_one_token_per_byte(tmp_path):
    from data.tokenizer import ByteTokenizer, byte_level_chars

    ours = ByteTokenizer()
    cfg, params = random_model(vocab_size=257)
    ids = {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}
    write(cfg, params, ours.to_tokenizers(), ids, tmp_path / "m.gguf", "q8_0")
    meta, _ = fields(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.tokens"] == [byte_level_chars()[b] for b in range(256)] + ["<|endoftext|>"]
    assert meta["tokenizer.ggml.merges"] == ["\u00c0 \u00c0"]  # GGUF has no empty array: a merge UTF-8 never needs
    assert meta["tokenizer.ggml.bos_token_id"] == 256


def test_a_tokenizer_llama_cpp_would_read_differently_is_refused(tmp_path):
    import tokenizers

    from data.tokenizer import HFTokenizer

    cfg, params = random_model()
    for change, message in [
        (
            lambda t: setattr(t, "normalizer", tokenizers.normalizers.NFC()),
            "normalizer 'NFC': llama.cpp's gpt2 has none",
        ),
        (lambda t: setattr(t, "pre_tokenizer", tokenizers.pre_tokenizers.Whitespace()), "pre-tokenizer 'Whitespace'"),
        (
            lambda t: setattr(t, "pre_tokenizer", tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)),
            "pre-tokenizer 'ByteLevel'",
        ),
    ]:
        tok = tokenizers.Tokenizer.from_str(bpe_tokenizer().tok.to_str())
        change(tok)
        with pytest.raises(GGUFError, match=message) as e:
            write(cfg, params, HFTokenizer(tok, "changed").to_tokenizers(), SPECIAL, tmp_path / "m.gguf", "f16")
        assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()
    llama3 = json.loads(bpe_tokenizer("llama-bpe").tok.to_str())
    llama3["model"]["ignore_merges"] = False
    with pytest.raises(GGUFError, match="ignore_merges=False: llama.cpp's 'llama-bpe' assumes True"):
        tok = tokenizers.Tokenizer.from_str(json.dumps(llama3))
        write(cfg, params, tok, SPECIAL, tmp_path / "m.gguf", "f16")


def test_mtp_heads_are_left_out(tmp_path):
    plain_cfg, plain = random_model()
    cfg, params = random_model(mtp={"num_heads": 1})
    assert "mtp" in params
    ours = tensors_for_gguf(cfg, params)
    assert ours.keys() == tensors_for_gguf(plain_cfg, plain).keys()
    np.testing.assert_array_equal(ours["blk.1.ffn_up.weight"], np.asarray(params["layer_1"]["mlp"]["up"]["kernel"]).T)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mlp="moe", moe={"num_experts": 4, "top_k": 2}), r"llama \(as llama\): model.mlp='moe'"),
        (
            dict(
                attention="mla", mla={"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}
            ),
            "model.attention='mla'",
        ),  # fmt: skip
        (dict(position="alibi"), "model.position='alibi'"),
        (
            dict(rope_scaling=RopeScaling("yarn", 4.0, original_max_len=16)),
            "rope_scaling.type='yarn' .llama.cpp's llama",
        ),
        (dict(qk_norm=True, rope_scaling=LLAMA3), "qwen3 .as qwen3.: model.rope_scaling.type='llama3'"),
        (dict(sliding_window=16), r"model.sliding_window=16 < model.max_seq_len=128 \(llama.cpp's llama attends"),
        (dict(final_logit_softcap=30.0), "model.final_logit_softcap=30.0"),
    ],
)
def test_a_model_no_gguf_architecture_runs_is_one_line_and_nothing_is_written(overrides, message, tmp_path):
    cfg = ModelConfig(**(TINY | overrides))
    with pytest.raises(GGUFError, match=message) as e:
        write(cfg, {}, bpe_tokenizer().to_tokenizers(), SPECIAL, tmp_path / "m.gguf", "f16")
    assert str(e.value).startswith("no GGUF architecture we write represents this model (") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_command_exports_a_workdir_and_refuses_bad_input_before_writing(eval_run, tmp_path, capsys):
    """A trained workdir exports (and reads back with the run's config); an existing OUT is kept without --overwrite
    and replaced with it; an unknown --type, an unrepresentable model and a missing workdir are one line, exit 2,
    nothing written."""
    from data.tokenizer import ByteTokenizer
    from training.checkpoint import load_for_inference

    out = tmp_path / "m.gguf"
    code, err = export([str(eval_run), str(out), "--type", "q8_0"], capsys)
    assert code == 0 and f"exported {eval_run} to {out} (f32: 5, q8_0: 15)" in err, err
    run, params, _, _ = load_for_inference(eval_run)
    meta, tensors = fields(out)
    assert meta["llama.block_count"] == run.model.num_layers and "output.weight" not in tensors  # tied embeddings
    np.testing.assert_array_equal(
        gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0),
        gguf.quants.dequantize(
            gguf.quants.quantize(
                tensors_for_gguf(run.model, params)["blk.0.ffn_up.weight"], gguf.GGMLQuantizationType.Q8_0
            ),
            gguf.GGMLQuantizationType.Q8_0,
        ),
    )

    before = out.read_bytes()
    code, err = export([str(eval_run), str(out), "--type", "f16"], capsys)
    assert code == 2 and err == f"error: {out}: exists (pass --overwrite to replace it)\n"
    assert out.read_bytes() == before
    code, err = export([str(eval_run), str(out), "--type", "f16", "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() != before and fields(out)[0]["general.file_type"] == 1

    bad = tmp_path / "bad.gguf"
    code, err = export([str(eval_run), str(bad), "--type", "q5_1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'q5_1'" in err and "'q8_0'" in err
    code, err = export([str(eval_run), str(bad), "--type", "f16", "--hf_dir", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: give either a workdir or --hf_dir") and err.count("\n") == 1
    untrained_workdir(tmp_path / "alibi", ByteTokenizer(), position="alibi")
    code, err = export([str(tmp_path / "alibi"), str(bad), "--type", "f16"], capsys)
    assert code == 2 and err.startswith("error: no GGUF architecture we write represents this model (")
    assert "model.position='alibi'" in err and err.count("\n") == 1
    code, err = export([str(tmp_path / "nothing"), str(bad), "--type", "f16"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["alibi", "m.gguf"]


def test_a_hugging_face_directory_exports_the_same_tensors(tmp_path, capsys):
    import model.hf
    from training.hf import special_ids, write_tokenizer

    cfg, params = random_model(**FAMILIES["qwen3"])
    tok = bpe_tokenizer()
    model.hf.save(cfg, params, tmp_path / "hf", token_ids=special_ids(tok))
    write_tokenizer(tok, tmp_path / "hf", cfg.max_seq_len)
    code, err = export(["--hf_dir", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--type", "f32"], capsys)
    assert code == 0, err
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "qwen3" and meta["qwen3.attention.key_length"] == 24
    for name, x in tensors_for_gguf(cfg, params).items():
        np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(x.shape), x)
    assert "blk.0.attn_q_norm.weight" in tensors


# -- llama.cpp itself ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_python() -> str:
    python = python_with_llama_cpp()
    if python is None:
        pytest.skip("no Python with llama_cpp (install llama-cpp-python, or set LLAMA_CPP_PYTHON to one that has it)")
    return python


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_computes_our_logits_from_a_float32_file(family, llama_python, tmp_path):
    """Unrounded weights and a float32 key/value cache: llama.cpp's logits are ours to float32 precision over 48
    positions (past llama3's original 16), so the mapping (renames, q/k interleaving for llama, none for qwen3's NEOX
    RoPE, rope_freqs, the linear factor, tied heads, head_dim != d_model / heads) is exact."""
    cfg, params = random_model(**FAMILIES[family])
    write(cfg, params, bpe_tokenizer().to_tokenizers(), SPECIAL, tmp_path / "m.gguf", "f32")
    ids = np.random.default_rng(1).integers(1, 280, (2, 48))
    theirs = llama_cpp(llama_python, tmp_path / "m.gguf", {"n_ctx": 64, "f32_cache": True, "logits": ids.tolist()})
    ours = np.asarray(model.logits(cfg, params, ids))
    for o, t in zip(ours, theirs["logits"]):
        assert np.abs(np.array(t) - o).max() / np.abs(o).max() < 1e-4


def test_llama_cpp_agrees_with_a_trained_run(eval_run, llama_python, tmp_path):
    """benchmarks/gguf_check.py on the trained fixture: f16 logits within 1e-3 of our float32 ones (relative to the
    largest), q8_0's within 3e-2; greedy continuations of 10 prompts identical for both; every text (code, Unicode,
    whitespace runs, digits) and prompt (with bos) tokenized to our ids."""
    from benchmarks.gguf_check import check

    f16, q8_0 = check(eval_run, tmp_path, ["f16", "q8_0"], llama_python)
    assert f16["logit_error"] < 1e-3 and q8_0["logit_error"] < 3e-2 and f16["margin"] > 0.05  # no near ties
    for row in (f16, q8_0):
        assert row["greedy_agree"] == row["prompts"] == 10
        assert row["tokenize_agree"] == row["texts"]
    assert q8_0["bytes"] < 0.65 * f16["bytes"]


def test_llama_cpp_tokenizes_like_the_byte_tokenizer(llama_python, tmp_path):
    """Every byte its own token, the text <|endoftext|> included (as ByteTokenizer reads it); with `special` llama.cpp
    reads that text as the end-of-document token."""
    from benchmarks.gguf_check import TEXTS
    from data.tokenizer import ByteTokenizer

    ours = ByteTokenizer()
    cfg, params = random_model(vocab_size=257)
    ids = {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}
    write(cfg, params, ours.to_tokenizers(), ids, tmp_path / "m.gguf", "f16")
    texts = [*TEXTS, "a<|endoftext|>b"]
    request = {"tokenize": [{"text": t} for t in texts] + [{"text": "a<|endoftext|>b", "special": True}]}
    theirs = llama_cpp(llama_python, tmp_path / "m.gguf", request)["tokenize"]
    assert theirs[:-1] == [ours.encode(t) for t in texts]
    assert theirs[-1] == [97, 256, 98]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_llama_cpp_tokenizes_like_a_bpe_tokenizer(pre, llama_python, tmp_path):
    from benchmarks.gguf_check import TEXTS

    ours = bpe_tokenizer(pre)
    cfg, params = random_model()
    write(cfg, params, ours.to_tokenizers(), SPECIAL, tmp_path / "m.gguf", "f16")
    assert fields(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == pre
    request = {"tokenize": [{"text": t} for t in TEXTS] + [{"text": "a<|endoftext|>b", "special": True}]}
    theirs = llama_cpp(llama_python, tmp_path / "m.gguf", request)["tokenize"]
    assert theirs == [ours.encode(t) for t in TEXTS] + [ours.encode("a<|endoftext|>b")]
    assert ours.encode("a<|endoftext|>b")[1] == ours.eod_id


def test_replacing_keeps_nothing_half_written(tmp_path):
    """The file appears whole: written beside OUT under a temporary name, then renamed."""
    cfg, params = random_model()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    broken = dataclasses.replace(cfg, num_layers=3)  # params lack layer_2: refused before writing
    with pytest.raises(GGUFError, match="params have no params/layer_2"):
        write(broken, params, bpe_tokenizer().to_tokenizers(), SPECIAL, path, "f16", overwrite=True)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("scheme,type", [("int4", "q4_0"), ("int8", "q8_0")])
def test_a_workdir_quantized_in_ggmls_blocks_exports_bit_for_bit(scheme, type, eval_run, tmp_path, capsys):
    """An int4/int8 group-32 workdir (`python -m model.quant`) as q4_0/q8_0: every block matrix of the file
    dequantizes to exactly the weights the workdir holds (its f32 export); the float run's own q4_0/q8_0 file,
    rounded by ggml from unrounded weights, does not."""
    from model.quant.__main__ import main as quantize

    quantize([str(eval_run), str(tmp_path / "q"), "--quant", scheme, "--quant_group", "32"])
    for source in ("q", "float"):
        workdir = str(tmp_path / "q") if source == "q" else str(eval_run)
        for t in ("f32", type):
            code, err = export([workdir, str(tmp_path / f"{source}.{t}.gguf"), "--type", t], capsys)
            assert code == 0, err
        _, exact = fields(tmp_path / f"{source}.f32.gguf")
        _, blocks = fields(tmp_path / f"{source}.{type}.gguf")
        matrices = [n for n, t in blocks.items() if t.tensor_type == getattr(gguf.GGMLQuantizationType, type.upper())]
        assert len(matrices) >= 5
        same = [
            np.array_equal(
                gguf.quants.dequantize(blocks[n].data, blocks[n].tensor_type).reshape(-1),
                np.asarray(exact[n].data).reshape(-1),
            )
            for n in matrices
        ]
        assert all(same) if source == "q" else not any(same), (source, matrices, same)


def test_a_qat_run_exports_the_weights_it_trained_with(eval_run):
    """A run trained with train.qat (int4, groups of 32) writes q4_0 blocks that hold exactly its rounded weights
    (what its forward pass used); other types get its float master weights."""
    import dataclasses

    from training.checkpoint import load_for_inference
    from training.config import QATConfig
    from training.gguf import float_weights

    run, params, _, _ = load_for_inference(eval_run)
    qat = dataclasses.replace(run, train=dataclasses.replace(run.train, qat=QATConfig("int4", 32)))
    assert float_weights(qat, params, "f16") is params and float_weights(run, params, "q4_0") is params
    q4 = gguf.GGMLQuantizationType.Q4_0
    for x in tensors_for_gguf(run.model, float_weights(qat, params, "q4_0")).values():
        if x.ndim == 2:  # every matrix (the embedding too: train.qat.skip keeps only routers)
            np.testing.assert_array_equal(gguf.quants.dequantize(gguf.quants.quantize(x, q4), q4), x)
    x = tensors_for_gguf(run.model, params)["blk.0.ffn_up.weight"]
    assert not np.array_equal(gguf.quants.dequantize(gguf.quants.quantize(x, q4), q4), x)

    # With learned clipping factors (kept in training.qat.CLIP_RANGE: clipped, never widened), q4_0 and q8_0 blocks
    # still hold exactly the weights the run trained with.
    from model.quant.params import initial_clips, spec_of

    rng = np.random.default_rng(0)
    for scheme, type in (("int4", "q4_0"), ("int8", "q8_0")):
        learned = dataclasses.replace(run.train, qat=QATConfig(scheme, 32, clip_lr=0.01))
        learned = dataclasses.replace(run, train=learned)
        clips = initial_clips(run.model, params, spec_of(learned.train.qat))
        clips = jax.tree.map(lambda c: rng.uniform(0.3, 1.0, c.shape).astype(np.float32), clips)
        qtype = getattr(gguf.GGMLQuantizationType, type.upper())
        rounded = tensors_for_gguf(run.model, float_weights(learned, params, type, clips))
        absmax = tensors_for_gguf(run.model, float_weights(learned, params, type))
        assert not np.array_equal(rounded["blk.0.ffn_up.weight"], absmax["blk.0.ffn_up.weight"])
        for x in rounded.values():
            if x.ndim == 2:
                np.testing.assert_array_equal(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype), x)
