"""The weight seam (model/weights.py) covers every matmul weight: a test-only format that reads each weight w as
f(w) = 1.01 w + 0.003 gives the logits the float format gives on params whose every matmul weight is f(w), for
each attention kind (GQA; MLA with a compressed query, in training and in both decode paths), MLP kind (SwiGLU,
GELU, MoE with a shared expert beside dense layers), head (tied, untied) and MTP style; and what it declared and
read is exactly the params tree's matmul weights, each once per call of its module."""

from __future__ import annotations

import collections
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, init_variables, unstack_layers, weights
from model.cache import init_cache
from model.mla import DECODES, MLAConfig
from model.moe import MoEConfig
from model.mtp import MTPConfig
from model.runtime import DecodeConfig, Runtime

MATMUL = ("kernel", "embedding", "router", "gate", "up", "down")  # the leaves matmuls read; the rest: norms, state
B, T = 2, 8
BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32, max_seq_len=T)
# Two configs cover every kind: scanned GQA + dense SwiGLU then MoE (a shared expert) + tied head + sequential MTP
# (whose block is MoE too); unrolled MLA (compressed query) + GELU + untied head + parallel MTP, also decoded.
GQA_MOE = dataclasses.replace(
    BASE,
    num_layers=3,
    mlp="moe",
    moe=MoEConfig(num_experts=4, top_k=2, d_ff_expert=16, num_shared_experts=1, first_dense_layers=1),
    mtp=MTPConfig(num_heads=1, style="sequential"),
)
MLA_GELU = dataclasses.replace(
    BASE,
    attention="mla",
    mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    mlp="gelu",
    tie_embeddings=False,
    mtp=MTPConfig(num_heads=1, style="parallel"),
    scan_layers=False,
)


def f(w):
    return w * 1.01 + 0.003


class Perturbed(weights.Float):
    """Stored as Float stores (the same params tree), read as f(w); records each weight it declares (its path)
    and reads (name, shape) while a forward pass is traced."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.declared, self.reads = [], []

    def create(self, module, name, init, shape, axes, param_dtype, layout):
        self.declared.append("/".join((*module.path, name)))
        return super().create(module, name, init, shape, axes, param_dtype, layout)

    def read(self, stored, name, dtype, shape, layout):
        w = super().read(stored, name, dtype, shape, layout)
        assert w.shape == shape
        self.reads.append((name, w.shape))
        return f(w)


@pytest.fixture
def perturbed(monkeypatch):
    fmt = Perturbed()
    monkeypatch.setitem(weights.FORMATS, "perturbed", fmt)
    return fmt


def is_matmul(path) -> bool:
    return path[-1].key in MATMUL


def keys(path) -> str:
    return "/".join(p.key for p in path)


@functools.cache
def setup(cfg: ModelConfig):
    """Variables drawn in NumPy (no initialiser to compile; norm scales far from 1), the same with every matmul
    weight f(w), tokens, MTP targets, and the float format's logits of both."""
    shapes = jax.eval_shape(lambda: nn.unbox(init_variables(Transformer(cfg), jax.random.key(0))))
    rng = np.random.default_rng(0)

    def draw(path, s):
        if path[0].key != "params":
            return np.zeros(s.shape, s.dtype)  # non-trained state (the router's bias)
        if is_matmul(path):
            return rng.normal(0.0, 0.2, s.shape).astype(s.dtype)
        return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: f(x) if p[0].key == "params" and is_matmul(p) else x, variables
    )
    tokens_BT = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    ahead_BTA = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T, 1 + cfg.mtp.num_heads)), jnp.int32)
    forward = jax.jit(functools.partial(run, Transformer(cfg)))
    return (
        variables,
        moved,
        tokens_BT,
        ahead_BTA,
        forward(moved, tokens_BT, ahead_BTA),
        forward(variables, tokens_BT, ahead_BTA),
    )


def run(model, variables, tokens_BT, ahead_BTA):
    out = model.apply(variables, tokens_BT, ahead_BTA=ahead_BTA, method="forward")
    return out.logits_BTV, out.extra.get("mtp")


def read_each(fmt: Perturbed, params: dict, calls: dict[str, int] | None = None):
    """Every matmul leaf of `params` was declared at its path and read at its shape once per call of its module
    (`calls`, default 1), and nothing else was."""
    leaves = [(keys(p), x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params) if is_matmul(p)]
    times = [(path, shape, (calls or {}).get(path, 1)) for path, shape in leaves]
    assert collections.Counter(fmt.declared) == collections.Counter({path: n for path, _, n in times})
    want = collections.Counter()
    for path, shape, n in times:
        want[path.rsplit("/", 1)[1], shape] += n
    assert collections.Counter(fmt.reads) == want


@pytest.mark.parametrize("cfg", [GQA_MOE, MLA_GELU], ids=["gqa-swiglu-moe-tied-sequential", "mla-gelu-untied-parallel"])
def test_the_perturbed_format_gives_the_logits_of_perturbed_params_and_reads_every_weight_once(perturbed, cfg):
    variables, moved, tokens_BT, ahead_BTA, want, plain = setup(cfg)
    got = jax.jit(functools.partial(run, Transformer(cfg, Runtime(weights="perturbed"))))(
        variables, tokens_BT, ahead_BTA
    )
    for g, w, p in zip(got, want, plain):  # the main head's logits, the MTP heads'
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(np.asarray(w) - np.asarray(p))) > 1e-2  # the perturbation shows
    # Counted on the unrolled stack, where each layer's weights are their own leaves (nn.scan traces its body twice).
    perturbed.reset()
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    variables = {k: unstack_layers(v, cfg) for k, v in variables.items()}
    jax.eval_shape(
        functools.partial(run, Transformer(unrolled, Runtime(weights="perturbed"))), variables, tokens_BT, ahead_BTA
    )
    heads = {} if cfg.tie_embeddings else {"head/kernel": 1 + cfg.mtp.num_heads}  # the MTP heads' logits use it too
    read_each(perturbed, variables["params"], heads)


@pytest.mark.parametrize("variant", DECODES)
def test_both_mla_decode_paths_read_every_weight_through_the_seam(perturbed, variant):
    """A prefill over the decode cache: absorbed decoding reads kv_up with weights.read (its Dense is never
    called), naive decoding through the Dense; either gives the perturbed params' logits."""
    variables, _, tokens_BT, _, (want, _), (plain, _) = setup(MLA_GELU)
    float_decoding = Transformer(MLA_GELU, Runtime.decoding())
    cache = jax.jit(lambda: init_cache(float_decoding, B, T))()
    model = Transformer(MLA_GELU, Runtime.decoding(DecodeConfig(weights="perturbed", attention=variant)))
    step = jax.jit(lambda v, c, t: model.apply({**v, "cache": c}, t, mutable=["cache"])[0])
    got = step(variables, cache, tokens_BT)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(want) - np.asarray(plain))) > 1e-2
    trunk = {k: v for k, v in variables["params"].items() if k != "mtp"}  # decoding runs no MTP head
    kv_up = [f"layer_{i}/attn/kv_up/kernel" for i in range(MLA_GELU.num_layers)]
    if variant == "absorbed":  # its Dense is never called: kv_up is read (weights.read) but not declared
        assert not set(kv_up) & set(perturbed.declared)
        perturbed.declared += kv_up
    read_each(perturbed, trunk)
