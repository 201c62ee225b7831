"""Calibrated post-training quantization (model/quant: calibrate, gptq, awq, calibrated): GPTQ against a literal
float64 reimplementation of the paper's Algorithm 1 (OBS updates with an explicit inverse Hessian), AWQ's search
against brute force, AWQ's folding exact in float, and the calibration statistics against the model's own
intermediate inputs."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.layers import Dense, Embed
from model.moe import MoE, MoEConfig
from model.quant import awq, calibrate, calibrated, gptq, schemes
from model.quant.params import quantize_params
from model.quant.schemes import Spec
from model.transformer import Transformer, init_variables


def correlated_inputs(rows: int, K: int, seed: int = 0) -> np.ndarray:
    """Rows whose channels are correlated and of unequal size, as a layer's inputs are."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(K, K)) / np.sqrt(K) + 0.3 * np.eye(K)
    return (rng.normal(size=(rows, K)) @ mix) * np.exp(rng.normal(size=K))


# ------------------------------------------------------------------------------------------------ GPTQ


def obs_reference(w_KN, H_KK, scheme: str, group: int, act_order: bool, percdamp: float = 0.01):
    """The paper's Algorithm 1 taken literally, float64: rows (input channels) in order, each rounded, its error
    spread over the rows still free by the OBS update, and the inverse Hessian of those rows updated by Gaussian
    elimination of the row just fixed. Scales by the scheme's rule when a group starts (or, with act-order or nf4,
    for every contiguous group up front). Returns (codes, scales, zero points, the quantized values)."""
    W, H = np.array(w_KN, np.float64), np.array(H_KK, np.float64)
    K, N = W.shape
    G = schemes.group_of(K, group)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H += percdamp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.inv(H)
    static = act_order or scheme == "nf4"
    s_GN = np.zeros((K // G, N), np.float32)
    z_GN = np.zeros((K // G, N), np.uint8) if "-zp" in scheme else None
    if static:
        _, s, z = schemes.codes_and_scales(jnp.asarray(W, jnp.float32), scheme, group)
        s_GN, z_GN = np.asarray(s), None if z is None else np.asarray(z)
    s_used = s_GN
    if scheme == "nf4":
        s_used = np.asarray(schemes.scales_of(schemes.store(jnp.zeros((K, N), jnp.uint8), s_GN, None, "nf4"), "nf4"))
    order = np.argsort(-np.diag(H_KK), kind="stable") if act_order else np.arange(K)
    Q, W_q = np.zeros((K, N), np.int32), np.zeros((K, N))
    for step, k in enumerate(order):
        g = k // G
        if not static and k % G == 0:
            _, s, z = schemes.codes_and_scales(jnp.asarray(W[k : k + G], jnp.float32), scheme, 0)
            s_GN[g] = np.asarray(s)[0]
            if z is not None:
                z_GN[g] = np.asarray(z)[0]
            s_used = s_GN
        z = None if z_GN is None else jnp.asarray(z_GN[g][None])
        q = schemes.codes_with(jnp.asarray(W[k][None], jnp.float32), scheme, jnp.asarray(s_used[g][None]), z)
        Q[k] = np.asarray(q)[0]
        W_q[k] = np.asarray(schemes.values_of(q, scheme, jnp.asarray(s_used[g][None]), z))[0]
        free = order[step + 1 :]
        W[free] -= np.outer(Hinv[free, k], (W[k] - W_q[k]) / Hinv[k, k])
        Hinv = Hinv - np.outer(Hinv[:, k], Hinv[k, :]) / Hinv[k, k]
    return Q, s_GN, z_GN, W_q


LAYER = (128, 16)  # K, N

CASES = [  # (scheme, group, act_order)
    ("int4", 32, False),
    ("int8", 0, False),
    ("int4-zp", 32, False),
    ("int8-zp", 0, False),
    ("nf4", 32, False),
    ("int4", 32, True),
]


@pytest.fixture(scope="module")
def layer():
    K, N = LAYER
    X = correlated_inputs(512, K)
    w = np.random.default_rng(1).normal(size=(K, N)) * 0.05
    H = X.T @ X
    H[:, 5] = H[5, :] = 0.0  # a dead input channel
    return X, w, H


@pytest.mark.parametrize("scheme,group,act_order", CASES)
def test_gptq_matches_the_obs_reference(layer, scheme, group, act_order):
    _, w, H = layer
    q, s, z = gptq.gptq_matrix(w, H, scheme, group, act_order=act_order, block=64)  # groups start mid-block
    q_ref, s_ref, z_ref, w_q_ref = obs_reference(w, H, scheme, group, act_order)
    np.testing.assert_array_equal(q, q_ref)  # float64 both ways: no rounding tie falls differently
    np.testing.assert_array_equal(s, s_ref)
    if z_ref is not None:
        np.testing.assert_array_equal(z, z_ref)
    stored = schemes.store(jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z), scheme)
    np.testing.assert_allclose(np.asarray(schemes.dequantize(stored, scheme)), w_q_ref, rtol=1e-6, atol=1e-7)


def output_error(X, w, w_q) -> float:
    return float(np.linalg.norm(X @ w - X @ w_q))


@pytest.mark.parametrize("scheme,group,act_order", [("int4", 32, False), ("int8", 0, False), ("int4", 32, True)])
def test_gptq_output_error_below_rtn(layer, scheme, group, act_order):
    X, w, _ = layer
    H = X.T @ X
    q, s, z = gptq.gptq_matrix(w, H, scheme, group, act_order=act_order)
    stored = schemes.store(jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z), scheme)
    w_gptq = np.asarray(schemes.dequantize(stored, scheme))
    w_rtn = np.asarray(schemes.dequantize(schemes.quantize(jnp.asarray(w, jnp.float32), scheme, group), scheme))
    assert output_error(X, w, w_gptq) < 0.85 * output_error(X, w, w_rtn)


# ------------------------------------------------------------------------------------------------- AWQ


def test_awq_search_matches_brute_force():
    K, N = 64, 8
    X = correlated_inputs(256, K, seed=2)
    ws = [np.random.default_rng(3 + i).normal(size=(K, N)) for i in range(2)]  # two weights reading one input
    spec = Spec("int4", 32)

    def rounded(w):
        return np.asarray(schemes.dequantize(schemes.quantize(jnp.asarray(w, jnp.float32), "int4", 32), "int4"))

    errors = []
    x_max = np.abs(X).mean(0)
    for alpha in np.arange(20) / 20:
        s = np.maximum(x_max**alpha, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        errors.append(sum(np.sum((X @ w - (X / s) @ rounded(w * s[:, None])) ** 2) for w in ws))
        if alpha == 0:
            assert np.allclose(s, 1.0)
    best = int(np.argmin(errors))
    s_best = np.maximum(x_max ** (best / 20), 1e-4)
    s_best = s_best / np.sqrt(s_best.max() * s_best.min())

    stats = calibrate.Stats(X.T @ X, np.abs(X).sum(0), np.asarray(float(len(X))))
    alpha, s_prod, s_K = awq.search(ws, stats, spec)
    assert alpha == best / 20 and best > 0
    np.testing.assert_allclose(s_K, s_best, rtol=1e-12)
    np.testing.assert_allclose(s_prod, s_best, rtol=1e-12)


# ------------------------------------------------------------------------------------- on a tiny model

TINY = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=61, max_seq_len=16)


def windows(n: int, cfg: ModelConfig = TINY, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, cfg.max_seq_len))


def with_outliers(variables: dict) -> dict:
    """A random model whose norm outputs have a few large channels, as trained models' do (AWQ's premise)."""
    gain = np.ones(TINY.d_model)
    gain[[3, 17, 40]] = 12.0

    def boost(path, x):
        names = [getattr(k, "key", "") for k in path]
        return x * gain if names[-1] == "scale" and "norm" in names[-2] else x

    return {**variables, "params": jax.tree_util.tree_map_with_path(boost, nn.meta.unbox(variables["params"]))}


@pytest.fixture(scope="module")
def tiny():
    variables = with_outliers(init_variables(Transformer(TINY), jax.random.key(0)))
    calib = windows(16)
    return variables, calib, calibrate.statistics(TINY, variables, calib)


forward = jax.jit(Transformer(TINY).apply)  # compiled once per tree structure: float, int4


def logit_error(variables, quantized, ids) -> float:
    return float(np.sqrt(np.mean((np.asarray(forward(quantized, ids)) - np.asarray(forward(variables, ids))) ** 2)))


def test_awq_folding_is_exact_and_beats_rtn(tiny):
    variables, calib, stats = tiny
    spec = Spec("int4", 32)
    folded = awq.fold_scales(TINY, variables, spec, stats)
    norm = folded["params"]["layers"]["attn_norm"]["scale"]
    assert not np.allclose(norm, variables["params"]["layers"]["attn_norm"]["scale"])  # scales moved
    ids = windows(4, seed=1)
    np.testing.assert_allclose(forward(folded, ids), forward(variables, ids), rtol=1e-4, atol=1e-5)
    rtn = logit_error(variables, calibrated.quantize(TINY, variables, spec, "rtn"), ids)
    assert logit_error(variables, awq.awq_quantize_params(TINY, variables, spec, stats), ids) < 0.9 * rtn


def test_gptq_model_is_sequential_and_beats_rtn(tiny):
    """Layer 0's weights see the float model's inputs, as non-sequential GPTQ's do; layer 1's see a quantized
    layer 0, so they differ; and the quantized model's logits are closer to the float ones than RTN's."""
    variables, calib, stats = tiny
    spec = Spec("int4", 32)
    seq = calibrated.quantize(TINY, variables, spec, "gptq", calib)
    flat = quantize_params(TINY, variables, spec, gptq.gptq(spec, stats))
    q = lambda tree, layer, name: np.asarray(tree["params"]["layers"]["mlp"][name]["kernel_int4"][layer])  # noqa: E731
    np.testing.assert_array_equal(q(seq, 0, "down"), q(flat, 0, "down"))
    assert not np.array_equal(q(seq, 1, "down"), q(flat, 1, "down"))
    ids = windows(4, seed=1)
    rtn = logit_error(variables, calibrated.quantize(TINY, variables, spec, "rtn"), ids)
    assert logit_error(variables, seq, ids) < rtn


MOE = dataclasses.replace(
    TINY, mlp="moe", moe=MoEConfig(num_experts=4, top_k=2, first_dense_layers=1), scan_layers=False
)


def test_statistics_are_the_inputs_each_matmul_sees():
    """Against x x^T of the inputs of every Dense, the tied head and each MoE expert (rows routed to it),
    recorded by intercepting the modules of the unrolled model; the scanned model stacks the same sums by layer.
    The model: a dense layer, then an MoE one (two scanned groups)."""
    variables = nn.meta.unbox(init_variables(Transformer(MOE), jax.random.key(1)))
    ids = windows(3, MOE, seed=4)
    seen: dict[tuple, list] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        path = tuple(module.scope.path)
        if isinstance(module, Dense) and context.method_name == "__call__":
            x = np.asarray(args[0], np.float64)
            seen.setdefault((*path, "kernel"), []).append(x.reshape(-1, int(np.prod(x.shape[-module.num_in :]))))
        elif isinstance(module, Embed) and context.method_name == "attend":
            seen.setdefault((*path, "embedding"), []).append(np.asarray(args[0], np.float64).reshape(-1, MOE.d_model))
        elif isinstance(module, MoE) and context.method_name == "__call__":
            seen.setdefault((*path, "moe"), []).append(np.asarray(args[0], np.float64).reshape(-1, MOE.d_model))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        Transformer(MOE).apply(variables, jnp.asarray(ids))
    expected = {path: x.T @ x for path, (x,) in seen.items() if path[-1] != "moe"}
    # The MoE layer's experts, from its router: each token's top-2 experts.
    ((x_TD,),) = [v for k, v in seen.items() if k[-1] == "moe"]
    p = variables["params"]["layer_1"]["mlp"]
    experts_TK = np.argsort(-(x_TD @ np.asarray(p["router"])), axis=1, kind="stable")[:, :2]
    h = lambda x, e: np.asarray(nn.silu(x @ np.asarray(p["gate"][e]))) * (x @ np.asarray(p["up"][e]))  # noqa: E731
    routed = [x_TD[(experts_TK == e).any(1)] for e in range(4)]
    expected[("layer_1", "mlp", "gate")] = np.stack([x.T @ x for x in routed])
    expected[("layer_1", "mlp", "down")] = np.stack([h(x, e).T @ h(x, e) for e, x in enumerate(routed)])
    expected[("layer_1", "mlp", "router")] = x_TD.T @ x_TD

    stats = calibrate.statistics(MOE, variables, ids, batch_size=2)  # two batches summed
    for path, xx in expected.items():
        np.testing.assert_allclose(stats[path].xx, xx, rtol=2e-5, atol=1e-5, err_msg="/".join(path))
    np.testing.assert_array_equal(stats[("layer_1", "mlp", "up")].count, [len(x) for x in routed])
    x = seen[("layer_0", "attn", "out", "kernel")][0]
    np.testing.assert_allclose(stats[("layer_0", "attn", "out", "kernel")].mean_abs, np.abs(x).mean(0), rtol=1e-5)

    scanned = dataclasses.replace(MOE, scan_layers=True)
    stacked = calibrate.statistics(
        scanned, jax.tree.map(_stack, variables, is_leaf=lambda x: x is not variables), ids, 3
    )
    np.testing.assert_allclose(
        stacked[("layers_0", "attn", "query", "kernel")].xx[0],
        expected[("layer_0", "attn", "query", "kernel")],
        rtol=2e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        stacked[("layers_1", "mlp", "down")].xx[0], expected[("layer_1", "mlp", "down")], rtol=2e-5, atol=1e-5
    )


def _stack(collection: dict) -> dict:
    """An unrolled model's variables (layer_0, layer_1: one each of the two groups) as the scanned one names them."""
    out = {k: v for k, v in collection.items() if not k.startswith("layer_")}
    for k, v in collection.items():
        if k.startswith("layer_"):
            out[f"layers_{k[len('layer_') :]}"] = jax.tree.map(lambda x: jnp.asarray(x)[None], v)
    return out
