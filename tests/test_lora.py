"""LoRA and QLoRA (model/weights.py's LoRA format, model/lora): each against a reference of its own. B = 0 is the base
model; a train step moves the adapters only; merging is W + (alpha / rank) A B in NumPy; our forward is peft's on the
same Hugging Face Llama and adapter weights, and a merged export loads in transformers with the same logits; QLoRA's
base is NF4 codes with double-quantized scales and computes what the dequantized base plus the adapters compute; a
LoRA run's checkpoints hold its adapters only and resume bit for bit."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import model.hf
from model import Transformer, init_variables, lora
from model.config import LoraConfig, ModelConfig
from model.quant.params import dequantize_params
from tests.conftest import tiny_run, untrained_workdir, write_corpus
from training.config import ConfigError, with_vocab

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def config(**overrides) -> ModelConfig:
    """A tiny model with LoRA rank 4, alpha 8 (scale 2) on every projection; its second layer an MoE one."""
    base = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=16)
    moe = dataclasses.replace(ModelConfig().moe, num_experts=4, top_k=2, first_dense_layers=1)
    lo = LoraConfig(rank=4, alpha=8.0, targets=ALL)
    return ModelConfig(**{**base, "mlp": "moe", "moe": moe, "lora": lo, **overrides})


@functools.cache
def forward(cfg: ModelConfig):
    """The model's apply, compiled once per config for the whole module."""
    return jax.jit(Transformer(cfg).apply)


@pytest.fixture(scope="module")
def initial():
    """(cfg, random params with B = 0 (A random), logits(cfg, params, tokens) with the MoE layer's router bias at
    zero). Random normal weights from NumPy: no initialiser to compile."""
    cfg = config()
    abstract = jax.eval_shape(lambda: nn.unbox(init_variables(Transformer(cfg), jax.random.key(0))))
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract["params"])
    params = jax.tree_util.tree_unflatten(
        treedef,
        [np.zeros(x.shape, x.dtype) if is_b(p) else 0.1 * rng.standard_normal(x.shape, x.dtype) for p, x in leaves],
    )
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract["state"])
    logits = lambda cfg, params, x: np.asarray(forward(cfg)({"params": params, "state": state}, x))  # noqa: E731
    return cfg, params, logits


def is_b(path) -> bool:
    return str(path[-1].key).endswith("_lora_b")


def randomized(params: dict, seed: int = 1) -> dict:
    """`params` with every adapter factor random and nonzero (what training would leave)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [0.2 * rng.standard_normal(x.shape, np.float32) if lora.is_adapter(p) else x for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def tokens(batch=2, length=12, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def test_with_B_zero_the_logits_are_the_base_models(initial):
    """A LoRA model with B = 0 (A random) computes what the same weights compute with no LoRA at all."""
    cfg, params, logits = initial
    adapted = [k for k in params["layers_1"]["mlp"] if k.endswith("_lora_a")]
    assert sorted(adapted) == ["down_lora_a", "gate_lora_a", "up_lora_a"]  # the experts are adapted too
    x = tokens()
    np.testing.assert_array_equal(logits(cfg, params, x), logits(lora.base_config(cfg), lora.base_of(params), x))


def test_merged_weights_are_W_plus_alpha_over_rank_A_B_and_compute_the_adapted_logits(initial):
    """Every adapted weight, per layer (and per expert), against NumPy: W + (alpha / rank) A B with A [in, r] and
    B [r, out] as matrices over the weight's input and output axes; the merged base model's logits are the LoRA
    model's (whose Dense layers never form A B)."""
    cfg, params, logits = initial
    params = randomized(params)
    merged = lora.merge(cfg, params)
    assert not jax.tree.leaves(lora.adapters(merged))
    scale, checked = 8.0 / 4, 0

    def check(parent, merged_parent, name, experts):
        nonlocal checked
        w = np.asarray(parent[name], np.float64)
        a, b = np.asarray(parent[f"{name}_lora_a"], np.float64), np.asarray(parent[f"{name}_lora_b"], np.float64)
        lead = w.shape[:2] if experts else w.shape[:1]  # the stacked layers (and experts)
        want = np.empty_like(w)
        for i in np.ndindex(*lead):
            a_KR, b_RN = a[i].reshape(-1, a.shape[-1]), b[i].reshape(b[i].shape[0], -1)
            want[i] = w[i] + scale * (a_KR @ b_RN).reshape(w[i].shape)
        np.testing.assert_allclose(merged_parent[name], want, rtol=1e-5, atol=1e-6)
        checked += 1

    for group in ("layers_0", "layers_1"):
        for proj in ("query", "key", "value", "out"):
            check(params[group]["attn"][proj], merged[group]["attn"][proj], "kernel", False)
    for proj in ("gate", "up", "down"):
        check(params["layers_0"]["mlp"][proj], merged["layers_0"]["mlp"][proj], "kernel", False)
        check(params["layers_1"]["mlp"], merged["layers_1"]["mlp"], proj, True)
    assert checked == 14
    x = tokens()
    adapted = logits(cfg, params, x)
    assert np.abs(adapted - np.asarray(logits(lora.base_config(cfg), lora.base_of(params), x))).max() > 1e-2
    np.testing.assert_allclose(logits(lora.base_config(cfg), merged, x), adapted, rtol=1e-5, atol=1e-5)


def test_a_train_step_changes_only_the_adapters_and_keeps_moments_only_for_them():
    """A QLoRA run (its NF4 base keeps float leaves too: embedding, head, norms): the adapters start with B = 0;
    after two steps every adapter factor moved and every other leaf, the NF4 codes and scales included, is bit for
    bit what it was; the optimizer holds moments for the adapters only. (A float base trains in the workdir test.)"""
    from training.optim import make_optimizer
    from training.step import init_state, make_train_step

    for base_quant in ("nf4",):
        lo = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "base_quant": base_quant}
        run = with_vocab(tiny_run(model={"d_model": 64, "lora": lo}, train={"batch_size": 2, "warmup_steps": 0}), 64)
        assert lora.TRAINABLE in run.train.trainable
        net = Transformer(run.model)
        tx, schedule = make_optimizer(run.train, run.model)
        state = init_state(net, tx, 0)
        before = jax.device_get(state.params)
        b_leaves = [b for p, b in jax.tree_util.tree_leaves_with_path(before) if is_b(p)]
        assert b_leaves and not any(b.any() for b in b_leaves)
        moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
        assert sorted(moments) == sorted(2 * [x.shape for x in jax.tree.leaves(lora.adapters(before))])
        step = jax.jit(make_train_step(net, tx, schedule, run.train))
        batch = {"tokens": jax.random.randint(jax.random.key(1), (2, run.data.seq_len + 1), 0, 64)}
        for _ in range(2):
            state, metrics = step(state, batch)
        assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
        after = jax.device_get(state.params)
        for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
            same = np.array_equal(np.asarray(old).view(np.uint8), np.asarray(new).view(np.uint8))
            assert same != lora.is_adapter(path), (base_quant, jax.tree_util.keystr(path))


def test_lora_plus_steps_b_with_ratio_times_the_learning_rate_as_numpys_adamw():
    """LoRA+ (`model.lora.lr_ratio`): three steps of make_optimizer's AdamW (clipping off) on an A, a B and a frozen
    base leaf equal NumPy's AdamW (decoupled decay) with B's learning rate times the ratio, A's unchanged; the
    optimizer state is plain LoRA's."""
    import optax

    from training.optim import make_optimizer

    run = tiny_run(model={"lora": {"rank": 4, "lr_ratio": 16.0}}, train={"grad_clip": 0.0, "warmup_steps": 2})
    t = run.train
    tx, schedule = make_optimizer(t, run.model)
    rng = np.random.default_rng(0)
    params = {"q": {"kernel": rng.standard_normal((6, 6)), "kernel_lora_a": rng.standard_normal((6, 4))}}
    params["q"]["kernel_lora_b"] = rng.standard_normal((4, 6))
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    state, ours = tx.init(params), params
    plain = make_optimizer(t, tiny_run(model={"lora": {"rank": 4}}).model)[0].init(params)
    assert jax.tree.structure(plain) == jax.tree.structure(state)  # so a run resumes with another ratio
    ref = {k: (np.asarray(v), 0.0, 0.0) for k, v in params["q"].items()}
    for step in range(3):
        grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
        updates, state = tx.update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        lr = float(schedule(step))
        for name, (p, m, v) in ref.items():
            g = np.asarray(grads["q"][name], np.float64)
            m, v = t.b1 * m + (1 - t.b1) * g, t.b2 * v + (1 - t.b2) * g * g
            adam = (m / (1 - t.b1 ** (step + 1))) / (np.sqrt(v / (1 - t.b2 ** (step + 1))) + t.eps)
            rate = 0.0 if name == "kernel" else lr * (16.0 if name.endswith("_b") else 1.0)
            ref[name] = (p - rate * (adam + t.weight_decay * p), m, v)
    for name, (p, _, _) in ref.items():
        np.testing.assert_allclose(ours["q"][name], p, rtol=2e-5, atol=1e-6, err_msg=name)
    assert not np.array_equal(ours["q"]["kernel_lora_b"], params["q"]["kernel_lora_b"])


def test_qlora_keeps_the_base_in_nf4_and_computes_the_dequantized_base_plus_the_adapters(initial):
    """The stored base: NF4 codes (two per byte), float8 scales with a float32 second-level scale and offset
    (double quantization); embedding, head and router kept in float. Its logits (Dense layers multiply from the
    codes, tile by tile) are those of the float LoRA model whose base is the dequantized one."""
    cfg, params, logits = initial
    qcfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, base_quant="nf4"))
    stored = lora.quantize_base(qcfg, randomized(params))
    query = stored["layers_0"]["attn"]["query"]
    assert sorted(query) == [
        "kernel_lora_a",
        "kernel_lora_b",
        "kernel_nf4",
        "kernel_offset",
        "kernel_scale",
        "kernel_scale2",
    ]
    assert query["kernel_nf4"].dtype == jnp.uint8 and query["kernel_nf4"].shape == (1, 32, 64)  # [layers, K / 2, N]
    assert query["kernel_scale"].dtype == jnp.float8_e4m3fn and query["kernel_scale2"].dtype == jnp.float32
    assert "gate_nf4" in stored["layers_1"]["mlp"] and "router" in stored["layers_1"]["mlp"]
    assert stored["embed"]["embedding"].dtype == jnp.float32
    dequantized = dequantize_params(qcfg, stored)
    x = tokens()
    want = logits(cfg, dequantized, x)
    np.testing.assert_allclose(logits(qcfg, stored, x), want, rtol=1e-4, atol=1e-4)
    w = np.asarray(randomized(params)["layers_0"]["attn"]["query"]["kernel"])
    error = np.abs(np.asarray(dequantized["layers_0"]["attn"]["query"]["kernel"]) - w).max()
    assert 0 < error < 0.25 * np.abs(w).max()  # NF4 rounding, not another weight


def test_our_forward_is_pefts_and_a_merged_export_loads_in_transformers(tmp_path):
    """A tiny random LlamaForCausalLM with a peft LoraConfig (r 4, alpha 8, every projection; A and B random and
    nonzero): imported into our params (model.hf.load, then the peft adapter via model.hf.from_peft), our LoRA
    logits are peft's; the merged weights exported with model.hf.save load in transformers with those logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.15, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hf_config).eval()
    base.save_pretrained(tmp_path / "base")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    x = np.random.default_rng(0).integers(0, 96, (2, 16))
    with torch.no_grad():
        want = peft_model(torch.tensor(x)).logits.numpy()
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            unadapted = plain(torch.tensor(x)).logits.numpy()
    assert np.abs(want - unadapted).max() > 0.1  # the adapters matter

    cfg, params = model.hf.load(tmp_path / "base")
    cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=4, alpha=8.0, targets=ALL))
    tensors = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(peft_model).items()}
    params = model.hf.from_peft(cfg, lora.attach(cfg, params, jax.random.key(0)), tensors)
    np.testing.assert_allclose(model.logits(cfg, params, x), want, rtol=1e-5, atol=2e-5)

    model.hf.save(lora.base_config(cfg), lora.merge(cfg, params), tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(x)).logits.numpy(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "lo, message",
    [
        (
            {"rank": 4, "targets": ("q", "query")},
            r"^model\.lora\.targets=\('q', 'query'\): 'query' is not a weight name",
        ),
        ({"rank": -1}, r"^model\.lora\.rank=-1: must be >= 0"),
        ({"rank": 4, "alpha": 0.0}, r"^model\.lora\.alpha=0\.0: must be > 0"),
        ({"rank": 4, "dropout": 1.0}, r"^model\.lora\.dropout=1\.0: must be in \[0, 1\)"),
        ({"rank": 4, "base_quant": "int4"}, r"^model\.lora\.base_quant='int4': '' \(float base\) or 'nf4'"),
        ({"base_quant": "nf4"}, r"^model\.lora\.base_quant='nf4': needs model\.lora\.rank > 0"),
        ({"rank": 4, "targets": ()}, r"^model\.lora\.targets=\(\): name at least one"),
        ({"rank": 4, "lr_ratio": 0.0}, r"^model\.lora\.lr_ratio=0\.0: must be > 0"),
    ],
)
def test_bad_lora_settings_are_one_line_config_errors(lo, message):
    with pytest.raises(ConfigError, match=message):
        tiny_run(model={"lora": lo})


def test_targets_no_weight_has_and_an_nf4_base_that_does_not_fit_are_refused_before_anything_runs(tmp_path):
    from training.loop import check_lora

    with pytest.raises(ConfigError, match=r"^model\.lora\.targets=\('kv_up',\): no weight of this model"):
        check_lora(tiny_run(model={"lora": {"rank": 4, "targets": ("kv_up",)}}))
    with pytest.raises(ConfigError, match=r"^model\.lora\.base_quant='nf4': layers/attn/query/kernel: quant group 64"):
        check_lora(tiny_run(model={"d_model": 32, "lora": {"rank": 4, "base_quant": "nf4"}}))


@pytest.mark.slow(40)
def test_a_lora_run_checkpoints_its_adapters_only_resumes_bit_for_bit_and_merges_into_a_workdir(tmp_path, capsys):
    """A LoRA run from another workdir's params (train.init_from): its checkpoints hold the adapters and their
    optimizer state, and name the step directory the base came from; resumed from step 2 it writes step 4's
    checkpoint and losses exactly as the uninterrupted run did; `python -m model.lora merge --hf` writes a plain
    workdir and a Hugging Face directory that compute what the LoRA run computes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from data.tokenizer import ByteTokenizer
    from model.lora.__main__ import main as lora_command
    from training.checkpoint import Checkpointer, abstract_params, checkpoints_dir, list_steps, load_for_inference
    from training.loop import train

    base_run, base_params = untrained_workdir(tmp_path / "base", ByteTokenizer())
    lo = {"rank": 4, "alpha": 8.0, "dropout": 0.1}
    run = tiny_run(
        model={"lora": lo},
        data={"corpus": str(write_corpus(tmp_path)), "val_fraction": 0.2},
        train={"steps": 4, "lr": 1e-2, "eval_every": 100, "init_from": str(tmp_path / "base")},
        checkpoint={"every": 2, "keep": 5},
    )
    workdir = tmp_path / "lora"
    train(run, workdir, quiet=True)
    step4 = checkpoints_dir(workdir) / "4"
    saved = json.loads((step4 / "params" / "_METADATA").read_text())["tree_metadata"]  # orbax's list of leaves
    assert saved and all(path.endswith(("_lora_a')", "_lora_b')")) for path in saved), list(saved)
    checkpointer = Checkpointer(checkpoints_dir(workdir))
    abstract = lora.adapters(abstract_params(with_vocab(run, 257).model))
    restored = checkpointer.restore(lambda r: {"params": abstract}, step=4)
    checkpointer.close()
    assert restored.train["lora_base"] == str(checkpoints_dir(tmp_path / "base") / "0")

    def rows():  # every metric but the timings
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines]

    reference_rows = rows()
    shutil.rmtree(step4)
    assert list_steps(workdir) == [2]
    train(run, workdir, quiet=True)
    assert rows() == reference_rows and any("eval/loss" in row for row in rows())
    checkpointer = Checkpointer(checkpoints_dir(workdir))
    resumed = checkpointer.restore(lambda r: {"params": abstract}, step=4).arrays["params"]
    checkpointer.close()
    same = lambda x, y: bool((np.asarray(x) == np.asarray(y)).all())  # noqa: E731
    assert jax.tree.all(jax.tree.map(same, resumed, restored.arrays["params"]))
    reference = load_for_inference(workdir)[1]
    assert jax.tree.all(jax.tree.map(same, lora.base_of(reference), base_params))  # the base, rebuilt from lora_base

    lora_command(["merge", str(workdir), str(tmp_path / "merged"), "--hf", str(tmp_path / "hf")])
    assert "with the adapters merged" in capsys.readouterr().out
    merged_run, merged, _, step = load_for_inference(tmp_path / "merged")
    assert step == 4 and merged_run.model.lora.rank == 0 and not jax.tree.leaves(lora.adapters(merged))
    x = tokens(vocab=257)
    want = np.asarray(model.logits(with_vocab(run, 257).model, reference, x))
    np.testing.assert_allclose(model.logits(merged_run.model, merged, x), want, rtol=1e-5, atol=1e-5)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_allclose(hf_model(torch.tensor(x)).logits.numpy(), want, rtol=1e-4, atol=1e-4)


def test_a_projection_adds_the_scaled_adapter_path_and_drops_its_inputs_only_while_training():
    """One Dense projection against NumPy: x W + (alpha / rank) (x A) B; given the train step's noise key, dropout
    zeroes some of the adapter's inputs (the output moves) but never the base path (with B = 0 nothing moves)."""
    from model.layers import Dense

    cfg = ModelConfig(d_model=8, lora=LoraConfig(rank=2, alpha=4.0, dropout=0.5, targets=("q",)))
    dense = Dense(cfg, (6,), ("embed", "mlp"), name="query")
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    params = randomized(nn.unbox(dense.init(jax.random.key(0), x))["params"])
    apply = jax.jit(lambda p, x, key: dense.apply({"params": p}, x, rngs={} if key is None else {"noise": key}))
    w, a, b = (np.asarray(params[k], np.float64) for k in ("kernel", "kernel_lora_a", "kernel_lora_b"))
    np.testing.assert_allclose(apply(params, x, None), x @ w + 2.0 * (x @ a) @ b, rtol=1e-5, atol=1e-5)
    dropped = np.asarray(apply(params, x, jax.random.key(1)))
    assert np.abs(dropped - x @ w - 2.0 * (x @ a) @ b).max() > 1e-3
    zero_b = {**params, "kernel_lora_b": np.zeros_like(params["kernel_lora_b"])}
    np.testing.assert_allclose(apply(zero_b, x, jax.random.key(1)), x @ w, rtol=1e-5, atol=1e-5)


def test_decoding_reads_the_adapters_mla_absorbed_included():
    """Decoding is the same model path: an MLA model with adapters on its query, latent down- and up-projections and
    output, decoded token by token with the absorbed latent cache (which reads kv_up's weight outside its Dense
    layer, through `weights.read`), gives the full forward's logits; and those are not the base model's."""
    from model.mla import MLAConfig
    from tests.test_variants import decode_logits

    mla = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    lo = LoraConfig(rank=2, alpha=4.0, targets=("q", "kv_down", "kv_up", "o"))
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=4, d_ff=64, max_seq_len=16,
                      attention="mla", mla=mla, lora=lo)  # fmt: skip
    abstract = jax.eval_shape(lambda: nn.unbox(init_variables(Transformer(cfg), jax.random.key(0)))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape).astype(x.dtype), abstract)
    x = jnp.asarray(tokens(length=12))
    full = np.asarray(forward(cfg)({"params": params}, x))
    base = np.asarray(forward(lora.base_config(cfg))({"params": lora.base_of(params)}, x))
    assert np.abs(full - base).max() > 0.1
    absorbed = decode_logits(cfg, params, x, max_len=16, variant="absorbed")[0]
    np.testing.assert_allclose(absorbed, full[:, 5:11], rtol=1e-4, atol=1e-4)


def test_a_projections_gradients_are_numpys_for_a_float_and_an_nf4_base():
    """d loss / d (x, A, B) of one projection, loss = sum(y * g), against NumPy's: x's gradient g (W + s A B)^T
    with W the float or the dequantized NF4 base (computed from the codes tile by tile, `codes_matmul`'s backward),
    A's s x^T g B^T, B's s (x A)^T g."""
    from model.layers import Dense
    from model.quant import schemes

    cfg = ModelConfig(d_model=512, lora=LoraConfig(rank=4, alpha=8.0, targets=("q",)))
    dense = Dense(cfg, (96,), ("embed", "mlp"), name="query")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 512)).astype(np.float32)
    g = rng.standard_normal((7, 96)).astype(np.float32)
    params = randomized(nn.unbox(dense.init(jax.random.key(0), x))["params"])
    stored = schemes.quantize(jnp.asarray(params["kernel"]), "nf4", 64)
    w_nf4 = np.asarray(schemes.dequantize(stored, "nf4"))
    names = {"q": "kernel_nf4", "scale": "kernel_scale", "scale2": "kernel_scale2", "offset": "kernel_offset"}
    nf4 = {names[k]: v for k, v in stored.items()} | {k: v for k, v in params.items() if "lora" in k}
    loss = lambda adapters, x, base: jnp.sum(dense.apply({"params": base | adapters}, x) * g)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for p, w in ((params, params["kernel"]), (nf4, w_nf4)):
        assert ("kernel_nf4" in p) == (w is w_nf4)
        a, b = (np.asarray(p[k], np.float64) for k in ("kernel_lora_a", "kernel_lora_b"))
        adapters = {k: v for k, v in p.items() if "lora" in k}
        dp, dx = grad(adapters, x, {k: v for k, v in p.items() if "lora" not in k})
        np.testing.assert_allclose(dx, g @ (np.asarray(w, np.float64) + 2.0 * a @ b).T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dp["kernel_lora_a"], 2.0 * x.T @ g @ b.T, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dp["kernel_lora_b"], 2.0 * (x @ a).T @ g, rtol=1e-4, atol=1e-3)
