"""Multi-token prediction heads (model/mtp.py): the windows and targets against NumPy shifts, each style's logits
against a by-hand composition of the shared pieces, the per-depth losses against NumPy cross-entropy, parameter
and FLOP counts against the initialised params and XLA's cost analysis, config errors, and a training run's
metrics."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.pipeline import Windows
from model import ModelConfig, Transformer, flops_per_token, init_variables, param_counts
from model import heads as heads_lib
from model import mtp as mtp_lib
from model.aux import weighted_sum
from model.block import Block
from model.mask import Mask
from model.mtp import MTPConfig
from tests.conftest import tiny_config
from tests.test_accounting import BASE, xla_flops_per_token
from training.config import ConfigError, resolve
from training.evaluation import Inputs

CFG = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=16,
                  init_std=0.3)  # fmt: skip


def with_mtp(cfg: ModelConfig, heads: int, style: str, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, mtp=MTPConfig(num_heads=heads, style=style), **kw)


def test_windows_carry_the_extra_targets_and_plain_windows_are_unchanged():
    tokens = np.arange(1000, 1000 + 103)
    plain, extra = Windows(tokens, 10), Windows(tokens, 10, 3)
    assert len(plain) == 10 and len(extra) == 9  # (103 - 1) // 10, (103 - 1 - 3) // 10
    for i in range(len(extra)):
        np.testing.assert_array_equal(plain[i], tokens[10 * i : 10 * i + 11])
        np.testing.assert_array_equal(extra[i], tokens[10 * i : 10 * i + 14])


def test_each_depth_targets_the_token_d_plus_one_ahead():
    rng = np.random.default_rng(0)
    T, K = 12, 3
    window_BW = rng.integers(0, 40, (2, T + 1 + K)).astype(np.int32)
    ahead_BTA = np.asarray(heads_lib.ahead(jnp.asarray(window_BW), K + 1))
    for t in range(T):
        for j in range(K + 1):
            np.testing.assert_array_equal(ahead_BTA[:, t, j], window_BW[:, t + 1 + j])
    # The loop's inputs: the main head sees the first T tokens and the next ones as targets.
    model = Transformer(with_mtp(CFG, K, "sequential"))
    params = nn.unbox(jit_init(model, 0))
    out, targets_BT = jax.jit(lambda w: Inputs(extra_tokens=K)(w, model, params))(jnp.asarray(window_BW))
    np.testing.assert_array_equal(targets_BT, window_BW[:, 1 : T + 1])
    assert out.logits_BTV.shape == (2, T, 40) and out.extra["mtp"].shape == (K, 2, T, 40)
    eval_inputs = jax.jit(lambda w: Inputs(extra_tokens=K).for_eval()(w, model, params))
    eval_out, eval_targets_BT = eval_inputs(jnp.asarray(window_BW[:, : T + 1]))
    assert "mtp" not in eval_out.extra and "mtp_loss" not in eval_out.aux
    np.testing.assert_array_equal(eval_targets_BT, targets_BT)
    np.testing.assert_allclose(eval_out.logits_BTV, out.logits_BTV, rtol=1e-6, atol=1e-6)  # the heads change nothing


def jit_init(model: Transformer, seed: int) -> dict:
    return jax.jit(lambda key: init_variables(model, key))(jax.random.key(seed))


def rms(x, scale, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(scale)


def by_hand(cfg, params, tokens_BT, ahead_BTA):
    """Each depth's logits composed from the pieces: NumPy norms, projection and tied unembedding around the
    model's own transformer block (sequential: each depth's own output norm; parallel: the main final norm)."""
    forward = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, method=Transformer.forward).hidden_BTD)
    trunk = forward(params, tokens_BT)
    emb_VD, p = np.asarray(params["embed"]["embedding"], np.float64), params["mtp"]
    mask = Mask.self_attention(jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape))
    spec = mtp_lib.block_spec(cfg)

    block_apply = jax.jit(Block(cfg, spec).apply)

    def block(d, x):
        y, _ = block_apply({"params": p[f"block_{d}"]}, jnp.asarray(x, jnp.float32), mask)
        return np.asarray(y, np.float64)

    logits, h = [], np.asarray(trunk, np.float64)
    for d in range(1, cfg.mtp.num_heads + 1):
        if cfg.mtp.style == "sequential":
            e = emb_VD[np.asarray(ahead_BTA[..., d - 1])]
            x = np.concatenate([rms(e, p[f"embed_norm_{d}"]["scale"]), rms(h, p[f"hidden_norm_{d}"]["scale"])], -1)
            h = block(d, x @ np.asarray(p[f"proj_{d}"]["kernel"], np.float64))
            logits.append(rms(h, p[f"head_norm_{d}"]["scale"]) @ emb_VD.T)  # the depth's own output norm
        else:
            logits.append(rms(block(d, trunk), params["final_norm"]["scale"]) @ emb_VD.T)
    return np.stack(logits)


@pytest.mark.parametrize("style", ["sequential", "parallel"])
def test_heads_and_per_depth_losses_match_an_independent_computation(style):
    cfg = with_mtp(CFG, 2, style)
    model = Transformer(cfg)
    params = nn.unbox(jit_init(model, 1)["params"])
    rng = np.random.default_rng(0)  # norm scales start at ones: make a swapped or shared norm visible
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key == "scale" else x,
        params,
    )
    window_BW = jax.random.randint(jax.random.key(2), (3, 16 + 1 + 2), 0, 40)
    out, _ = jax.jit(lambda w: Inputs(extra_tokens=2)(w, model, {"params": params}))(window_BW)
    tokens_BT, ahead_BTA = window_BW[:, :16], heads_lib.ahead(window_BW, 3)
    want_KBTV = by_hand(cfg, params, tokens_BT, ahead_BTA)
    np.testing.assert_allclose(out.extra["mtp"], want_KBTV, rtol=1e-4, atol=1e-4)

    w = np.asarray(window_BW)
    for d in (1, 2):
        logits = want_KBTV[d - 1]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        targets = w[:, 1 + d : 1 + d + 16]  # depth d: the token d + 1 after each position
        nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
        np.testing.assert_allclose(float(out.aux[f"mtp_loss_{d}"].value), nll, rtol=1e-5)
    mean = (float(out.aux["mtp_loss_1"].value) + float(out.aux["mtp_loss_2"].value)) / 2
    np.testing.assert_allclose(float(out.aux["mtp_loss"].value), mean, rtol=1e-6)
    np.testing.assert_allclose(float(weighted_sum(out.aux)), 0.3 * mean, rtol=1e-6)  # what the train loss adds


@pytest.mark.parametrize("style", ["sequential", "parallel"])
def test_parameter_count_includes_the_heads(style):
    for tie in (True, False):
        cfg = with_mtp(CFG, 2, style, tie_embeddings=tie)
        params = nn.unbox(jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0)))["params"])
        assert param_counts(cfg).total == sum(x.size for x in jax.tree.leaves(params))
        heads = sum(x.size for x in jax.tree.leaves(params["mtp"]))
        assert param_counts(cfg).total - param_counts(dataclasses.replace(cfg, mtp=MTPConfig())).total == heads


def xla_mtp_flops_per_token(cfg: ModelConfig) -> float:
    """XLA's count of one training step's gradient, MTP losses included, per token."""
    T, K = cfg.max_seq_len, cfg.mtp.num_heads
    model = Transformer(cfg)
    shapes = nn.unbox(jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # values do not change the count

    def loss(p, window_BW):
        out, targets_BT = Inputs(extra_tokens=K)(window_BW, model, {"params": p})
        logp = jax.nn.log_softmax(out.logits_BTV)
        return -jnp.mean(jnp.take_along_axis(logp, targets_BT[..., None], -1)) + weighted_sum(out.aux)

    window = jnp.zeros((2, T + 1 + K), jnp.int32)
    cost = jax.jit(jax.grad(loss)).lower(params, window).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / (2 * T)


@pytest.mark.parametrize("style", ["sequential", "parallel"])
def test_the_heads_flops_are_what_xla_counts_for_them(style):
    cfg = with_mtp(BASE, 1, style)
    ours = flops_per_token(cfg, cfg.max_seq_len) - flops_per_token(BASE, BASE.max_seq_len)
    theirs = xla_mtp_flops_per_token(cfg) - xla_flops_per_token(BASE)
    assert 0.95 <= ours / theirs <= 1.0, (ours, theirs)
    assert flops_per_token(cfg, 64, training=False) == flops_per_token(BASE, 64, training=False)  # sampling


@pytest.mark.parametrize(
    "mtp, message",
    [
        ({"num_heads": -1}, "model.mtp.num_heads=-1: must be >= 0 (0: no multi-token prediction)"),
        ({"num_heads": 1, "style": "bogus"}, "model.mtp.style='bogus': allowed: sequential, parallel"),
        ({"loss_weight": -0.5}, "model.mtp.loss_weight=-0.5: must be >= 0"),
        ({"depth": 2}, "model.mtp.depth: unknown key (allowed: num_heads, style, loss_weight)"),
    ],
)
def test_bad_mtp_config_is_a_one_line_error(mtp, message):
    with pytest.raises(ConfigError) as e:
        resolve(tiny_config(model={"mtp": mtp}))
    assert str(e.value) == message


def test_training_logs_the_heads_losses_beside_the_main_loss(mtp_mla_run):
    _, result = mtp_mla_run  # 2 sequential heads (on an MLA model)
    for key in ("train/loss", "train/mtp_loss", "train/mtp_loss_1", "train/mtp_loss_2", "eval/loss", "eval/bpb"):
        assert np.isfinite(result[key]), key
    assert not any(k.startswith("eval/mtp") for k in result)
