"""Multi-head Latent Attention (model/mla.py): one layer against NumPy and against transformers' DeepseekV3Attention,
causality, the compressed-cache decoders (absorbed == naive == the full forward), rewinding, counts against the
initialised params and XLA's cost analysis, and its config errors."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, flops_per_token, init_variables, param_counts
from model.cache import Rows, rewind
from model.mask import Mask
from model.mla import MLA, MLAConfig
from model.rope import RopeScaling, inverse_frequencies
from tests.test_variants import decode_logits, distinct_prompts, greedy_against_recomputation
from training.config import ConfigError, resolve

MLA_DIMS = MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
CFG = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_seq_len=32, attention="mla",
                  mla=MLA_DIMS)  # fmt: skip
# DeepSeek-V3's YaRN settings (factor 40, mscale = mscale_all_dim = 1), scaled to a short context.
YARN = RopeScaling(type="yarn", factor=4.0, original_max_len=8, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                   mscale_all_dim=1.0)  # fmt: skip


def perturbed(params, seed=0):
    """Norm scales away from 1 (ones would hide a norm applied in the wrong place)."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        return x * rng.uniform(0.5, 1.5, x.shape).astype(x.dtype) if "norm" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(one, params)


def init(cfg: ModelConfig, seed: int = 0) -> dict:
    variables = jax.jit(lambda key: init_variables(Transformer(cfg), key))(jax.random.key(seed))
    return perturbed(nn.unbox(variables)["params"], seed)


def layer_params(cfg: ModelConfig, seed: int = 0):
    B, T = 2, 10
    x = jax.random.normal(jax.random.key(seed), (B, T, cfg.d_model))
    positions = jnp.asarray(np.stack([np.arange(T), np.arange(3, 3 + T)]))  # row 1 starts at position 3
    mask = Mask.self_attention(positions)
    params = nn.unbox(jax.jit(MLA(cfg).init)(jax.random.key(seed + 1), x, mask))["params"]
    params = jax.tree.map(lambda w: w * 4 if w.ndim > 1 else w, perturbed(params, seed))  # logits far from 0
    return params, x, positions, mask


# ----------------------------------------------------------------------------------------- one layer


def numpy_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def numpy_mla(cfg: ModelConfig, p: dict, x, positions):
    """One MLA layer in float64 NumPy, written from the DeepSeek-V2 paper's equations: RoPE rotates each interleaved
    pair (x[2i], x[2i+1]) in place by position * inv_freq[i], cos and sin times YaRN's attention factor."""
    m, eps = cfg.mla, cfg.norm_eps
    P, R, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    p = jax.tree.map(lambda w: np.asarray(w, np.float64), p)
    x = np.asarray(x, np.float64)
    if m.q_lora_rank:
        q = np.einsum("btq,qne->btne", numpy_rms(x @ p["q_down"]["kernel"], p["q_norm"]["scale"], eps),
                      p["q_up"]["kernel"])  # fmt: skip
    else:
        q = np.einsum("btd,dne->btne", x, p["query"]["kernel"])
    kv = x @ p["kv_down"]["kernel"]
    latent = numpy_rms(kv[..., :C], p["kv_norm"]["scale"], eps)
    up = np.einsum("btc,cnf->btnf", latent, p["kv_up"]["kernel"])
    k_nope, v = up[..., :P], up[..., P:]
    inv_freq = np.asarray(inverse_frequencies(R, cfg.rope_theta, cfg.rope_scaling), np.float64)
    s = cfg.rope_scaling
    attn_factor = 1.0
    if s.type == "yarn":
        ms = lambda f, a: 0.1 * a * math.log(f) + 1.0  # noqa: E731
        attn_factor = ms(s.factor, s.mscale) / ms(s.factor, s.mscale_all_dim)

    def rotate_interleaved(y):  # [B, T, ..., R]
        angle = np.asarray(positions, np.float64)[:, :, None, None] * inv_freq
        cos, sin = attn_factor * np.cos(angle), attn_factor * np.sin(angle)
        out = y.copy()
        out[..., 0::2] = y[..., 0::2] * cos - y[..., 1::2] * sin
        out[..., 1::2] = y[..., 1::2] * cos + y[..., 0::2] * sin
        return out

    q_rope = rotate_interleaved(q[..., P:])
    k_rope = rotate_interleaved(kv[:, :, None, C:])[:, :, 0]
    scale = (P + R) ** -0.5
    if s.type == "yarn" and s.mscale_all_dim:
        scale *= (0.1 * s.mscale_all_dim * math.log(s.factor) + 1.0) ** 2
    logits = (np.einsum("btnp,bsnp->bnts", q[..., :P], k_nope) + np.einsum("btnr,bsr->bnts", q_rope, k_rope)) * scale
    pos = np.asarray(positions)
    allowed = pos[:, None, :, None] >= pos[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnv->btnv", probs, v)
    return np.einsum("btnv,nvd->btd", out, p["out"]["kernel"])


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"mla": dataclasses.replace(MLA_DIMS, q_lora_rank=0)},
        {"rope_scaling": YARN},
    ],
    ids=["q_lora", "no_q_lora", "yarn"],
)
def test_one_layer_matches_numpy(changes):
    cfg = dataclasses.replace(CFG, **changes)
    params, x, positions, mask = layer_params(cfg)
    got, _ = jax.jit(MLA(cfg).apply)({"params": params}, x, mask)
    np.testing.assert_allclose(got, numpy_mla(cfg, params, x, positions), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("yarn", [False, True])
def test_one_layer_matches_transformers_deepseek_v3_with_the_documented_weight_mapping(yarn):
    """The weight layout of model/mla.py's docstring: kernels are torch Linear weights transposed and reshaped."""
    torch = pytest.importorskip("torch")
    deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = dataclasses.replace(CFG, rope_scaling=YARN if yarn else RopeScaling())
    m, N, D = cfg.mla, cfg.num_heads, cfg.d_model
    params, x, positions, mask = layer_params(cfg, seed=3)
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if yarn:
        rope_parameters = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": YARN.factor,
                           "original_max_position_embeddings": YARN.original_max_len, "beta_fast": YARN.beta_fast,
                           "beta_slow": YARN.beta_slow, "mscale": YARN.mscale,
                           "mscale_all_dim": YARN.mscale_all_dim}  # fmt: skip
    hf_cfg = DeepseekV3Config(
        hidden_size=D, num_attention_heads=N, num_key_value_heads=N, q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim, rms_norm_eps=cfg.norm_eps, rope_interleave=True, attention_bias=False,
        max_position_embeddings=64, rope_parameters=rope_parameters,
    )  # fmt: skip
    hf_cfg._attn_implementation = "eager"
    attn = deepseek.DeepseekV3Attention(hf_cfg, layer_idx=0).double()
    t = lambda w: torch.tensor(np.asarray(w, np.float64).reshape(w.shape[0], -1).T.copy())  # noqa: E731
    sd = {
        "q_a_proj.weight": t(params["q_down"]["kernel"]),
        "q_a_layernorm.weight": torch.tensor(np.asarray(params["q_norm"]["scale"], np.float64)),
        "q_b_proj.weight": t(params["q_up"]["kernel"]),
        "kv_a_proj_with_mqa.weight": t(params["kv_down"]["kernel"]),
        "kv_a_layernorm.weight": torch.tensor(np.asarray(params["kv_norm"]["scale"], np.float64)),
        "kv_b_proj.weight": t(params["kv_up"]["kernel"]),
        "o_proj.weight": t(np.asarray(params["out"]["kernel"]).reshape(N * m.v_head_dim, D)),
    }
    attn.load_state_dict(sd)
    rotary = deepseek.DeepseekV3RotaryEmbedding(hf_cfg).double()
    hidden = torch.tensor(np.asarray(x, np.float64))
    pos = torch.tensor(np.asarray(positions))
    cos, sin = rotary(hidden, pos)
    allowed = pos[:, None, :, None] >= pos[:, None, None, :]
    bias = torch.where(allowed, 0.0, -torch.inf).double()
    want, _ = attn(hidden, (cos, sin), bias)
    got, _ = jax.jit(MLA(cfg).apply)({"params": params}, x, mask)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=2e-4, atol=2e-5)


def test_later_tokens_do_not_change_earlier_logits():
    params = init(CFG)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))
    changed = tokens.copy()
    changed[:, 9:] = (changed[:, 9:] + 1) % CFG.vocab_size
    apply = jax.jit(Transformer(CFG).apply)
    a, b = (apply({"params": params}, jnp.asarray(t)) for t in (tokens, changed))
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


# ----------------------------------------------------------------------------------------- decoding


def test_absorbed_decoding_equals_naive_decoding_equals_the_full_forward():
    # Windowed layers (rolling caches) between global ones (full caches), under YaRN's scales.
    cfg = dataclasses.replace(CFG, rope_scaling=YARN, sliding_window=4, global_every=2)
    params = init(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)))
    full = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)[:, 5:15]
    absorbed, cache, _ = decode_logits(cfg, params, tokens, max_len=16, variant="absorbed")
    naive, _, _ = decode_logits(cfg, params, tokens, max_len=16, variant="naive")
    np.testing.assert_allclose(absorbed, naive, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(absorbed, full, rtol=1e-5, atol=1e-5)
    # The cache holds the latent and the rope key only (a windowed layer's rolling cache keeps its window).
    caches = jax.tree.leaves(cache, is_leaf=lambda c: isinstance(c, Rows))
    assert {tuple(c.arrays) for c in caches} == {("latent",)}
    assert {c.arrays["latent"].shape[2] for c in caches} == {cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim}
    assert {c.size for c in caches} == {4, 16}


def test_absorbed_and_naive_greedy_decoding_equal_recomputation():
    cfg = dataclasses.replace(CFG, sliding_window=4, global_every=2, tie_embeddings=False)
    params = init(cfg)
    prompts = distinct_prompts(cfg.vocab_size, [7, 2, 11])  # left-padded, longer than the window
    absorbed, naive = (
        greedy_against_recomputation(cfg, params, prompts, 12, max_len=28, variant=mode)
        for mode in ("absorbed", "naive")
    )
    np.testing.assert_array_equal(absorbed, naive)


@pytest.mark.parametrize("max_rewind", [3, 16])  # a rolling window cache with 3 spare slots, a full one
def test_rewinding_the_latent_cache_equals_never_having_written_it(max_rewind):
    cfg = dataclasses.replace(CFG, sliding_window=3)
    params = init(cfg)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 15))
    _, cache, (apply, _) = decode_logits(cfg, params, jnp.asarray(tokens[:, :14]), 16, max_rewind, prefill=6)
    cache = rewind(cache, jnp.asarray([9, 12]))  # row 0 forgets positions 9..12, row 1 forgets 12
    redo = tokens.copy()
    redo[0, 9:11], redo[1, 12:14] = rng.integers(0, cfg.vocab_size, (2, 2))
    fresh, _, _ = decode_logits(cfg, params, jnp.asarray(redo), 16, max_rewind, prefill=6)  # logits of 5..13
    for step in range(2):
        at = np.array([9 + step, 12 + step])
        logits, v = apply(cache, jnp.asarray(redo[[0, 1], at])[:, None], jnp.asarray(at)[:, None])
        cache = v["cache"]
        for row in range(2):
            np.testing.assert_allclose(logits[row, 0], fresh[row, at[row] - 5], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("changes", [{}, {"mla": dataclasses.replace(MLA_DIMS, q_lora_rank=0)}])
def test_param_counts_match_the_initialised_params(changes):
    cfg = dataclasses.replace(CFG, **changes)
    counts = param_counts(cfg)
    params = nn.unbox(jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0))))["params"]
    assert counts.total == counts.active == sum(x.size for x in jax.tree.leaves(params))


# causal_blocks=1: attention computes the whole T x T square, as the count does.
BASE = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_seq_len=64, attention="mla",
                   mla=MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=16),
                   scan_layers=False, attention_impl="xla", causal_blocks=1)  # fmt: skip


@functools.cache
def xla_flops_per_token(cfg: ModelConfig) -> float:
    """XLA's cost analysis of one training step's gradient, per token."""
    B, T = 2, cfg.max_seq_len
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])

    def loss(p, tokens):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    cost = jax.jit(jax.grad(loss)).lower(params, jnp.zeros((B, T + 1), jnp.int32)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)


def mla(**changes) -> dict:
    return {"mla": dataclasses.replace(BASE.mla, **changes)}


# Ours leaves out elementwise work (softmax, norms, RoPE) that XLA counts: ours / XLA's sits just below 1.
@pytest.mark.parametrize(
    "term, change, lowest",
    [
        ("attention (seq_len)", {"max_seq_len": 128}, 0.93),
        ("latent (kv_lora_rank)", mla(kv_lora_rank=64), 0.97),
        ("query compression (q_lora_rank)", mla(q_lora_rank=64), 0.97),
        ("values (v_head_dim)", mla(v_head_dim=32), 0.97),
    ],
)
def test_each_term_of_the_flops_count_matches_what_xla_counts_for_it(term, change, lowest):
    other = dataclasses.replace(BASE, **change)
    ours = flops_per_token(other, other.max_seq_len) - flops_per_token(BASE, BASE.max_seq_len)
    theirs = xla_flops_per_token(other) - xla_flops_per_token(BASE)
    assert lowest <= ours / theirs <= 1.0, (term, ours, theirs)


def test_the_whole_flops_count_is_xlas_less_its_elementwise_work():
    ratio = flops_per_token(BASE, BASE.max_seq_len) / xla_flops_per_token(BASE)
    assert 0.97 <= ratio <= 1.0, ratio


# ----------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "values, match",
    [
        ({"mla": {"kv_lora_rank": 0}}, r"^model.mla.kv_lora_rank=0: must be > 0$"),
        ({"mla": {"q_lora_rank": -1}}, r"^model.mla.q_lora_rank=-1: must be >= 0 \(0: no query compression\)$"),
        ({"mla": {"qk_rope_head_dim": 5}}, r"^model.mla.qk_rope_head_dim=5: must be even"),
        ({"mla": {"v_head_dim": -2}}, r"^model.mla.v_head_dim=-2: must be > 0$"),
        ({"position": "alibi"}, r"^model.position='alibi': must be 'rope' for attention='mla'"),
        ({"qk_norm": True}, r"^model.qk_norm=True: must be False for attention='mla'"),
        ({"mla": {"decode": "naive"}}, r"^model.mla.decode: unknown key \(allowed: q_lora_rank, kv_lora_rank"),
        ({"mla": {"bogus": 1}}, r"^model.mla.bogus: unknown key"),
    ],
)
def test_bad_mla_values_are_one_line_config_errors(values, match):
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=match):
        resolve(tiny_config(model={"attention": "mla", **values}))


def test_an_mla_run_config_reads_back_from_its_dict():
    from tests.conftest import tiny_config
    from training.config import from_dict

    run = resolve(tiny_config(model={"attention": "mla", "mla": {"kv_lora_rank": 24}}))
    assert from_dict(run.to_dict()) == run and run.model.mla.kv_lora_rank == 24


def test_a_bad_mla_decode_flag_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    from model.mla import DECODES
    from tests.conftest import REPO

    command = [sys.executable, "infer.py", f"--workdir={tmp_path}", "--prompt=x", "--mla_decode=bogus"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert f"--mla_decode='bogus': one of {', '.join(DECODES)}" in done.stderr
