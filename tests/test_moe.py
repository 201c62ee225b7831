"""model/moe.py against independent references: NumPy routers and capacity, the balancing loss and z-loss
formulas, a dense every-expert-on-every-token layer, per-group NumPy matmuls, XLA's FLOP count, and training runs
(bias balancing, SIGKILL resumption, model state at inference)."""

from __future__ import annotations

import dataclasses
import math
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, flops_per_token, init_variables, param_counts
from model import moe as moe_lib
from model.moe import MoE, MoEConfig
from tests.conftest import tiny_config
from training.config import ConfigError, resolve

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=48, max_seq_len=16,
                  mlp="moe", moe=MoEConfig(num_experts=4, top_k=2, d_ff_expert=24))  # fmt: skip


def with_moe(cfg: ModelConfig = CFG, **moe) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


def layer_vars(cfg: ModelConfig, x_BTD, seed: int = 0) -> dict:
    return nn.unbox(jax.jit(MoE(cfg).init)(jax.random.key(seed), x_BTD))


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_topk(scores_TE, k):
    """Indices of the k largest per row, largest first (ties: lower index, as lax.top_k)."""
    return np.argsort(-scores_TE, axis=-1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------------------------ routers


def test_softmax_router_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 8)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=8).astype(np.float32)
    for norm in (True, False):
        m = MoEConfig(num_experts=8, top_k=3, norm_topk_prob=norm, routed_scaling=1.5)
        r = moe_lib.softmax_router(m, jnp.asarray(logits), jnp.asarray(bias))
        probs = np_softmax(logits.astype(np.float64))
        idx = np_topk(probs + bias, 3)
        gates = np.take_along_axis(probs, idx, -1)
        if norm:
            gates = gates / gates.sum(-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(r.experts_TK), idx)
        np.testing.assert_allclose(np.asarray(r.gates_TK), 1.5 * gates, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(r.probs_TE), probs, rtol=1e-5)


def test_sigmoid_router_keeps_the_best_groups_by_their_top2_and_gates_without_the_bias():
    rng = np.random.default_rng(1)
    T, E, G, J, K = 32, 16, 4, 2, 4
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=E).astype(np.float32)
    m = MoEConfig(num_experts=E, top_k=K, router="sigmoid", n_group=G, topk_group=J, routed_scaling=2.5)
    r = moe_lib.sigmoid_router(m, jnp.asarray(logits), jnp.asarray(bias))
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    for t in range(T):
        choice = scores[t] + bias
        group_score = [sorted(choice[g * 4 : g * 4 + 4])[-2:] for g in range(G)]
        best_groups = np.argsort([-sum(s) for s in group_score], kind="stable")[:J]
        allowed = [e for e in range(E) if e // 4 in best_groups]
        want = sorted(allowed, key=lambda e: -choice[e])[:K]
        assert list(np.asarray(r.experts_TK[t])) == want
        gates = scores[t, want] / scores[t, want].sum()
        np.testing.assert_allclose(np.asarray(r.gates_TK[t]), 2.5 * gates, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.probs_TE), scores / scores.sum(-1, keepdims=True), rtol=1e-5)


# ------------------------------------------------------------------------------------------ losses, bias


def test_balancing_loss_is_one_when_uniform_and_grows_with_imbalance():
    E, T = 4, 8
    uniform = moe_lib.Routing(
        jnp.asarray([[t % E, (t + 1) % E] for t in range(T)]), jnp.ones((T, 2)), jnp.full((T, E), 1 / E)
    )
    assert float(moe_lib.balance_loss(uniform, E)) == pytest.approx(1.0)
    losses = []
    for skew in (0.0, 0.5, 1.0):  # assignments and probability move toward expert 0
        probs = (1 - skew) * np.full((T, E), 1 / E) + skew * np.eye(E)[0]
        experts = [[0, 1] if t < skew * T else [t % E, (t + 1) % E] for t in range(T)]
        routing = moe_lib.Routing(jnp.asarray(experts), jnp.ones((T, 2)), jnp.asarray(probs, jnp.float32))
        losses.append(float(moe_lib.balance_loss(routing, E)))
    assert losses[0] == pytest.approx(1.0) and losses[0] < losses[1] < losses[2]


def test_the_layers_balancing_loss_and_its_gradient_through_the_probabilities_only_match_numpy():
    """The layer's term (its weight, and E * sum_e f_e P_e) and d/dW_router against NumPy: f (the assignment
    fractions) is piecewise constant, so the gradient is x^T dlogits with dlogits = P * (g - sum_e P g), g = E f / T."""
    cfg = with_moe(aux_loss_weight=0.03)
    x = jax.random.normal(jax.random.key(2), (2, 8, 32))
    v = layer_vars(cfg, x)
    router = jax.random.normal(jax.random.key(3), v["params"]["router"].shape)  # probabilities far from uniform

    def aux_loss(router):
        term = MoE(cfg).apply({**v, "params": {**v["params"], "router": router}}, x)[1]["moe_aux_loss"]
        return term.value, term.weight

    (value, weight), grad = jax.jit(jax.value_and_grad(aux_loss, has_aux=True))(router)
    assert float(weight) == pytest.approx(0.03)
    x_TD, w_DE = np.asarray(x, np.float64).reshape(-1, 32), np.asarray(router, np.float64)
    T, E = x_TD.shape[0], 4
    probs = np_softmax(x_TD @ w_DE)
    f = np.bincount(np_topk(probs, 2).ravel(), minlength=E) / (2 * T)
    assert float(value) == pytest.approx(E * np.sum(f * probs.mean(0)), rel=1e-5)
    g_E = E * f / T
    want = x_TD.T @ (probs * (g_E - (probs * g_E).sum(-1, keepdims=True)))
    assert np.abs(want).max() > 1e-3  # the assignments are uneven: a gradient to find
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


def test_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits():
    cfg = with_moe(z_loss_weight=0.001)
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))
    v = layer_vars(cfg, x)
    _, aux = MoE(cfg).apply(v, x)
    logits = np.asarray(x, np.float64).reshape(-1, 32) @ np.asarray(v["params"]["router"], np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(aux["moe_z_loss"].value) == pytest.approx(np.mean(lse**2), rel=1e-5)
    assert aux["moe_z_loss"].weight == 0.001 and aux["moe_max_load"].weight == 0.0


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_the_correction_bias_moves_a_skewed_routers_load_toward_uniform(router):
    cfg = with_moe(router=router, bias_update_rate=0.01, top_k=1)
    x = jax.random.normal(jax.random.key(2), (4, 16, 32)).at[..., 0].set(1.0)  # feature 0: a constant
    v = layer_vars(cfg, x)
    v["params"]["router"] = (0.3 * jax.random.normal(jax.random.key(3), (32, 4))).at[0, 0].add(3.0)  # favour expert 0
    step = jax.jit(lambda v: MoE(cfg).apply(v, x, mutable=["state"]))
    loads = []
    for _ in range(150):
        (_, aux), state = step(v)
        v = {**v, **state}
        loads.append(float(aux["moe_max_load"].value))
    assert loads[0] > 2.0 and np.mean(loads[-20:]) < 1.3, (loads[0], loads[-20:])
    # Outside training (state immutable) the bias does not move.
    (_, _), same = jax.jit(lambda v: (MoE(cfg).apply(v, x), v["state"]))(v)
    np.testing.assert_array_equal(same["bias"], v["state"]["bias"])


def test_router_noise_only_where_a_noise_rng_is_given():
    cfg = with_moe(router_noise=0.5)
    x = jax.random.normal(jax.random.key(3), (2, 8, 32))
    v = layer_vars(cfg, x)
    plain = MoE(with_moe(router_noise=0.0)).apply(v, x)[0]
    np.testing.assert_array_equal(MoE(cfg).apply(v, x)[0], plain)
    noisy = MoE(cfg).apply(v, x, rngs={"noise": jax.random.key(0)})[0]
    assert not np.allclose(noisy, plain)


# -------------------------------------------------------------------------------------------------- dispatch


def np_choice(cfg: ModelConfig, params: dict, x_BTD) -> np.ndarray:
    logits = np.asarray(x_BTD, np.float64).reshape(-1, x_BTD.shape[-1]) @ np.asarray(params["router"], np.float64)
    return np_topk(np_softmax(logits), cfg.moe.top_k)


def dense_reference(cfg: ModelConfig, params: dict, x_BTD, idx, keep_TK=None):
    """Every expert on every token, weighted by its gate (0 where the token did not pick it in `idx`, or where
    keep_TK drops the assignment)."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    probs = jax.nn.softmax(x_TD @ params["router"], -1)
    picked = np.zeros(probs.shape, np.float32)
    np.put_along_axis(picked, idx, 1.0, -1)
    gates = probs * picked / jnp.sum(probs * picked, -1, keepdims=True)
    if keep_TK is not None:
        kept = np.zeros(probs.shape, np.float32)
        np.put_along_axis(kept, idx, keep_TK.astype(np.float32), -1)
        gates = gates * kept
    h = jax.nn.silu(jnp.einsum("td,edf->etf", x_TD, params["gate"])) * jnp.einsum("td,edf->etf", x_TD, params["up"])
    y = jnp.einsum("etf,efd->etd", h, params["down"])
    return jnp.einsum("te,etd->td", gates, y).reshape(x_BTD.shape)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_layer_output_and_gradients_match_the_dense_reference(dispatch):
    cfg = with_moe(dispatch=dispatch, capacity_factor=4.0, aux_loss_weight=0.0)
    x = jax.random.normal(jax.random.key(4), (2, 8, 32))
    variables = layer_vars(cfg, x)
    params, state = variables["params"], variables["state"]
    target = jax.random.normal(jax.random.key(5), x.shape)

    def loss(apply):
        return lambda p, x: jnp.sum(apply(p, x) * target)

    ours = loss(lambda p, x: MoE(cfg).apply({"params": p, "state": state}, x)[0])
    idx = np_choice(cfg, params, x)
    theirs = loss(lambda p, x: dense_reference(cfg, p, x, idx))
    (y_ours, g_ours), (y_theirs, g_theirs) = (jax.jit(jax.value_and_grad(f, (0, 1)))(params, x) for f in (ours, theirs))
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropless_equals_capacity_when_capacity_is_ample_and_ragged_dot_equals_the_cpu_tiles():
    x = jax.random.normal(jax.random.key(6), (2, 16, 32))
    cfg = with_moe(num_experts=8, top_k=2, num_shared_experts=1)
    params = layer_vars(cfg, x)
    dropless = jax.jit(MoE(cfg).apply)(params, x)
    ample = jax.jit(MoE(with_moe(cfg, dispatch="capacity", capacity_factor=8.0)).apply)(params, x)
    np.testing.assert_allclose(dropless[0], ample[0], rtol=1e-5, atol=1e-6)
    assert float(ample[1]["moe_dropped_frac"].value) == 0.0
    routing = moe_lib.softmax_router(cfg.moe, jax.random.normal(jax.random.key(7), (32, 8)), jnp.zeros(8))
    experts_A = routing.experts_TK.T.reshape(-1)
    p = params["params"]
    x_TD = x.reshape(-1, 32)
    ffn = jax.jit(
        lambda p, backend: moe_lib.experts_ffn(
            x_TD, routing, p["gate"], p["up"], p["down"], moe_lib.dropless_rows(cfg.moe, experts_A, backend)
        ),
        static_argnums=1,
    )
    outs = [ffn(p, b) for b in ("cpu", "gpu")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_capacity_drops_exactly_what_numpy_drops():
    cfg = with_moe(num_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.5, aux_loss_weight=0.0)
    x = jax.random.normal(jax.random.key(8), (2, 8, 32))
    v = layer_vars(cfg, x)
    v["params"]["router"] = v["params"]["router"].at[:, 1].add(0.2)  # overflow expert 1
    y, aux = MoE(cfg).apply(v, x)
    # NumPy: first choices of all tokens in order, then second choices; each expert keeps its first C.
    idx = np_choice(cfg, v["params"], x)
    T = idx.shape[0]
    C = math.ceil(0.5 * T * 2 / 4)
    seen, keep = np.zeros(4, int), np.zeros((T, 2), bool)
    for k in range(2):
        for t in range(T):
            keep[t, k] = seen[idx[t, k]] < C
            seen[idx[t, k]] += 1
    assert 0 < (~keep).sum()
    assert float(aux["moe_dropped_frac"].value) == pytest.approx((~keep).mean())
    np.testing.assert_allclose(y, dense_reference(cfg, v["params"], x, idx, keep), rtol=1e-5, atol=1e-6)


def test_tiled_matmul_matches_per_group_numpy_and_costs_the_padded_flops():
    rng = np.random.default_rng(2)
    E, K, N = 4, 32, 48
    counts = np.array([37, 0, 100, 19])
    A = int(counts.sum())
    experts_A = jnp.asarray(rng.permutation(np.repeat(np.arange(E), counts)))
    rows = moe_lib.dropless_rows(MoEConfig(num_experts=E), experts_A, "cpu")
    x_AK = rng.normal(size=(A, K)).astype(np.float32)
    w = rng.normal(size=(E, K, N)).astype(np.float32)
    dy = rng.normal(size=(A, N)).astype(np.float32)
    tile = moe_lib.tile_rows(A, E)

    def through_rows(x_AK, w, unroll=1):
        x_RK = jnp.zeros((rows.num_rows + 1, K)).at[rows.row_A].set(x_AK)[:-1]
        ends = np.cumsum(-(-counts // tile))
        expert_N = jnp.asarray(np.minimum(np.searchsorted(ends, np.arange(rows.num_rows // tile), "right"), E - 1))
        y_RN = moe_lib.tiled_matmul(x_RK, w, expert_N, tile, unroll)
        return y_RN[rows.row_A]

    y = through_rows(x_AK, w)
    e = np.asarray(experts_A)
    want = np.einsum("ak,akn->an", x_AK, w[e])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    dx, dw = jax.vjp(through_rows, x_AK, w)[1](dy)
    np.testing.assert_allclose(dx, np.einsum("an,akn->ak", dy, w[e]), rtol=1e-5, atol=1e-4)
    want_dw = np.stack([x_AK[e == g].T @ dy[e == g] for g in range(E)])
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)

    # XLA's count of the compiled forward and backward (the loop unrolled, so each trip is counted), against the
    # FLOPs of the padded rows: at most the tiles the layout allots, never every group on every row.
    def fwd_bwd(x, w):
        y, pullback = jax.vjp(lambda x, w: through_rows(x, w, unroll=True), x, w)
        return pullback(dy)

    cost = jax.jit(fwd_bwd).lower(x_AK, w).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    useful = 3 * 2 * A * K * N
    padded = 3 * 2 * rows.num_rows * K * N
    assert useful <= flops <= padded * 1.02, (useful, flops, padded)
    assert padded < 3 * 2 * E * A * K * N / 2  # far under a dense over-all-groups lowering


# ---------------------------------------------------------------------------------------- model, counts


def test_layer_pattern_counts_and_param_tree():
    cfg = with_moe(dataclasses.replace(CFG, num_layers=5), first_dense_layers=1, every=2, num_shared_experts=1)
    assert [s.mlp for s in cfg.layer_specs()] == ["swiglu", "moe", "swiglu", "moe", "swiglu"]
    variables = nn.unbox(jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0))))  # shapes only
    counts = param_counts(cfg)
    assert counts.total == sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    D, F, E = 32, 24, 4
    dense_mlp, per_moe_active = 3 * D * 48, 3 * D * F * (2 + 1) + D * E
    assert counts.total - counts.active == 2 * 3 * D * F * (E - 2)  # two MoE layers, E - top_k idle experts each
    assert per_moe_active == MoE.matmul_params(cfg) and dense_mlp == 3 * D * cfg.d_ff


def xla_flops_per_token(cfg: ModelConfig, B: int = 2) -> float:
    T = cfg.max_seq_len
    model = Transformer(cfg)
    shapes = nn.unbox(jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # values do not change the count

    def loss(p, tokens):
        logits = model.apply({"params": p, "state": variables["state"]}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    compiled = jax.jit(jax.grad(loss)).lower(variables["params"], jnp.zeros((B, T + 1), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)


def test_flops_per_token_counts_active_experts_as_xla_does():
    """Capacity dispatch at factor 1 computes exactly the active assignments' rows (no loop), so XLA's count of
    the MoE term is the active FLOPs; the term we add for top_k 1 -> 2 must be what XLA adds."""
    base = dataclasses.replace(
        with_moe(dispatch="capacity", capacity_factor=1.0, top_k=1, num_experts=4, d_ff_expert=64),
        d_model=64, num_heads=4, num_kv_heads=4, max_seq_len=32, scan_layers=False, causal_blocks=1,
        attention_impl="xla",
    )  # fmt: skip
    more = with_moe(base, top_k=2)
    xla_more = xla_flops_per_token(more)  # compiled once for both checks
    ours = flops_per_token(more, 32) - flops_per_token(base, 32)
    theirs = xla_more - xla_flops_per_token(base)
    assert 0.95 <= ours / theirs <= 1.0, (ours, theirs)
    assert 0.9 <= flops_per_token(more, 32) / xla_more <= 1.0


def test_bad_moe_values_are_one_line_errors():
    for key, value, message in [
        ("router", "x", "model.moe.router='x': one of 'softmax', 'sigmoid'"),
        ("dispatch", "all", "model.moe.dispatch='all': one of 'dropless', 'capacity'"),
        ("top_k", 9, "model.moe.top_k=9: must be in [1, num_experts=8]"),
        ("n_group", 3, "model.moe.n_group=3: must be > 0 and divide num_experts=8"),
    ]:
        with pytest.raises(ConfigError) as e:
            resolve(tiny_config(model={"mlp": "moe", "moe": {key: value}}))
        assert str(e.value) == message
    with pytest.raises(ConfigError, match="model.moe.bogus: unknown key"):
        resolve(tiny_config(model={"mlp": "moe", "moe": {"bogus": 1}}))


# ---------------------------------------------------------------------------------------- training runs

MOE_RUN = {
    "mlp": "moe",
    "moe": {"num_experts": 8, "top_k": 2, "d_ff_expert": 16, "router": "sigmoid", "n_group": 2, "topk_group": 1,
            "num_shared_experts": 1, "first_dense_layers": 1, "bias_update_rate": 0.003, "router_noise": 0.1},
}  # fmt: skip


def test_a_preempted_moe_run_resumes_bit_identically_bias_included(tmp_path, text_corpus, monkeypatch):
    """The router's correction bias is model state: checkpointed and restored with the run, so a run stopped at step 3
    and resumed logs the losses of one that never stopped. In-process (SIGTERM to itself at step 2, as a preemption):
    tests/test_checkpoint.py kills train.py processes anywhere, with a toy MLP whose state goes the same way."""
    import os

    from tests.test_checkpoint import curve
    from training import loop
    from training.checkpoint import checkpoints_dir, list_steps, load_for_inference

    run = resolve(tiny_config(
        model={**MOE_RUN, "num_layers": 3},
        data={"corpus": str(text_corpus), "val_fraction": 0.2},
        train={"steps": 8, "log_every": 2, "eval_every": 4},
        checkpoint={"every": 100},
    ))  # fmt: skip
    monkeypatch.setattr(loop, "peak_flops", lambda *args: (1e12, "not measured"))
    loop.train(run, tmp_path / "reference", quiet=True)
    write = loop.MetricsWriter.write

    def preempt_at_2(self, step, metrics):
        write(self, step, metrics)
        if step == 2 and "train/loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: finish the step, checkpoint, return

    workdir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loop.MetricsWriter, "write", preempt_at_2)
        assert loop.train(run, workdir, quiet=True)["preempted"]
    assert list_steps(workdir) == [2]
    loop.train(run, workdir, quiet=True)
    assert [step for step, _ in curve(workdir)] == [2, 4, 6, 8]
    for name in ("train/loss", "train/moe_aux_loss", "train/moe_max_load", "eval/bpb"):
        assert curve(workdir, name) == curve(tmp_path / "reference", name), name
    assert (checkpoints_dir(workdir) / "8" / "model_state").is_dir()
    # Inference gets the bias too: load_for_inference gives {"params", "state"}, which sampling/ applies.
    run, weights, tokenizer, _ = load_for_inference(workdir)
    bias = np.asarray(weights["state"]["layers_1"]["mlp"]["bias"])
    reference = np.asarray(load_for_inference(tmp_path / "reference")[1]["state"]["layers_1"]["mlp"]["bias"])
    np.testing.assert_array_equal(bias, reference)
    assert np.abs(bias).max() > 0  # the trained bias, not a fresh zero one
    from sampling import generate

    model = Transformer(run.model)
    prompt = [tokenizer.eod_id, *tokenizer.encode("def f")]
    assert len(generate(model, weights, prompt, 6, seed=0)) == 6
    # The unrolled sampling network with the bias computes the training network's logits.
    tokens = jnp.asarray([prompt])
    want = jax.jit(model.apply)(weights, tokens)
    from sampling.decode import for_inference, unrolled

    net = for_inference(model, kv_cache=False)
    np.testing.assert_allclose(jax.jit(net.apply)(unrolled(weights, net), tokens), want, rtol=1e-5, atol=1e-5)


def test_the_isoflop_planner_sizes_an_moe_family_by_active_params():
    from experiments.plan import Family, plan_one

    base = with_moe(dataclasses.replace(CFG, vocab_size=256), d_ff_expert=0, num_experts=8, top_k=2)
    planned = plan_one(base, Family(), 1e12, 2e5, seq_len=16, batch_size=4)
    cfg = dataclasses.replace(base, **planned.model)
    counts = param_counts(cfg)
    assert planned.params == counts.active_non_embedding < counts.total == planned.params_total
    assert planned.flops == pytest.approx(planned.tokens * flops_per_token(cfg, 16))
