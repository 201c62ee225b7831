"""The extra heads' table (model/heads.py): a head added to HEADS alone, here a toy linear probe of the token two
ahead, gets its params under its name, longer training windows, its logits and loss in the forward pass (in
training only) and its counts, with nothing else naming it; `ahead` against NumPy shifts."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig, Transformer, flops_per_token, init_variables, param_counts
from model import heads as heads_lib
from model.aux import Aux
from model.layers import dense
from model.mtp import MTPConfig
from training.evaluation import Inputs

CFG = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=16)


class Probe(nn.Module):
    cfg: ModelConfig
    rt: object

    @nn.compact
    def __call__(self, trunk_BTD):
        return dense(self.cfg, self.rt, self.cfg.vocab_size, ("embed", "vocab"), "out")(trunk_BTD).astype(jnp.float32)


class ToyHead:
    """Predicts the token two after each position from the trunk's last hidden state."""

    training_only = True

    @staticmethod
    def active(cfg):
        return True

    @staticmethod
    def extra_tokens(cfg):
        return 1

    @staticmethod
    def forward(cfg, rt, name, trunk_BTD, ahead_BTA, mask, embedding, logits_of):
        return Probe(cfg, rt, name=name)(trunk_BTD)

    @staticmethod
    def losses(cfg, logits_BTV, ahead_BTA):
        logp_BTV = jax.nn.log_softmax(logits_BTV)
        nll_BT = -jnp.take_along_axis(logp_BTV, ahead_BTA[..., 1:2], axis=-1)[..., 0]
        return {"toy_loss": Aux(jnp.mean(nll_BT), 0.5)}

    @staticmethod
    def param_count(cfg):
        return cfg.d_model * cfg.vocab_size

    matmul_params = param_count

    @staticmethod
    def attention_flops(cfg, seq_len):
        return 0


def test_ahead_column_j_is_the_token_j_plus_one_after():
    window_BW = np.random.default_rng(0).integers(0, 40, (2, 12 + 3)).astype(np.int32)
    ahead_BTA = np.asarray(heads_lib.ahead(jnp.asarray(window_BW), 3))
    assert ahead_BTA.shape == (2, 12, 3)
    for j in range(3):
        np.testing.assert_array_equal(ahead_BTA[..., j], window_BW[:, 1 + j : 13 + j])


def test_a_head_added_to_the_table_is_built_trained_and_counted(monkeypatch):
    base_counts, base_train, base_eval = param_counts(CFG), flops_per_token(CFG, 16), flops_per_token(CFG, 16, False)
    monkeypatch.setitem(heads_lib.HEADS, "toy", ToyHead)
    assert list(heads_lib.active(CFG)) == ["toy"] and heads_lib.extra_tokens(CFG) == 1
    assert heads_lib.extra_tokens(dataclasses.replace(CFG, mtp=MTPConfig(num_heads=2))) == 2  # the furthest reader

    model = Transformer(CFG)
    params = nn.unbox(jax.jit(lambda: init_variables(model, jax.random.key(0)))()["params"])  # jitted: eager is slow
    assert params["toy"]["out"]["kernel"].shape == (32, 40)
    assert param_counts(CFG).total == base_counts.total + 32 * 40 == sum(x.size for x in jax.tree.leaves(params))
    assert flops_per_token(CFG, 16) == base_train + 6 * 32 * 40 and flops_per_token(CFG, 16, False) == base_eval

    window_BW = jax.random.randint(jax.random.key(1), (2, 16 + 2), 0, 40)
    out, _ = jax.jit(lambda w, p: Inputs(extra_tokens=1)(w, model, {"params": p}))(window_BW, params)
    want_BTV = np.asarray(out.hidden_BTD) @ np.asarray(params["toy"]["out"]["kernel"])
    np.testing.assert_allclose(out.extra["toy"], want_BTV, rtol=1e-5, atol=1e-5)
    logp_BTV = jax.nn.log_softmax(want_BTV)
    want_loss = -np.mean(np.take_along_axis(logp_BTV, np.asarray(window_BW)[:, 2:, None], axis=-1))
    assert out.aux["toy_loss"].weight == 0.5
    np.testing.assert_allclose(out.aux["toy_loss"].value, want_loss, rtol=1e-5)

    eval_out, _ = jax.jit(lambda w, p: Inputs(extra_tokens=1).for_eval()(w, model, {"params": p}))(
        window_BW[:, :-1], params
    )
    assert eval_out.extra == {} and "toy_loss" not in eval_out.aux
