"""The model's seams and the variants that prove them: sliding windows (rolling decode caches), document masks,
QK-norm, soft-caps, per-layer patterns, auxiliary terms and non-trained state, each against NumPy or brute force."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tests.toy_kinds  # noqa: F401  (registers model.mlp='toy')
from model import ModelConfig, Transformer, init_variables, layer_groups, param_counts, unstack_layers
from model.accounting import attention_flops_per_token
from model.attention import cpu_kernel_blocker, reference_attention
from model.cache import init_cache, rewind
from model.gqa import GQA
from model.mask import Mask, documents
from model.positions import apply_rope, rope
from model.rope import RopeScaling, attention_factor
from model.runtime import DecodeConfig, Runtime
from sampling.decode import left_pad
from tests.conftest import REPO, tiny_run
from training.config import ConfigError, resolve
from training.evaluation import Inputs, cross_entropy
from training.optim import make_optimizer
from training.step import init_state, make_train_step

CFG = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=32)
YARN = RopeScaling(type="yarn", factor=2.0, original_max_len=16)
ALL_OPTIONS = dict(
    sliding_window=4, global_every=2, qk_norm=True, attn_logit_softcap=5.0, final_logit_softcap=3.0, rope_scaling=YARN
)


def init(cfg: ModelConfig, seed: int = 0) -> dict:
    """Variables with non-trivial norm weights (ones would hide a norm applied in the wrong place)."""
    variables = nn.unbox(jax.jit(lambda key: init_variables(Transformer(cfg), key))(jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        return x * rng.uniform(0.5, 1.5, x.shape).astype(x.dtype) if "norm" in name else x

    return {**variables, "params": jax.tree_util.tree_map_with_path(perturb, variables["params"])}


# ----------------------------------------------------------------------------------------- masks against NumPy


def numpy_mask(q_pos, k_pos, q_seg=None, k_seg=None, window=0):
    """[B, T, S] by the rules written out: real key, not after the query, inside the window, same document."""
    q, k = np.asarray(q_pos)[:, :, None], np.asarray(k_pos)[:, None, :]
    allowed = (k <= q) & (k >= 0)
    if window:
        allowed &= q - k < window
    if q_seg is not None:
        allowed &= np.asarray(q_seg)[:, :, None] == np.asarray(k_seg)[:, None, :]
    return allowed


def numpy_attention(q, k, v, allowed, softcap=0.0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros((B, T, N, v.shape[-1]))
    for b in range(B):
        for h in range(N):
            s = q[b, :, h] @ k[b, :, h // G].T / np.sqrt(H)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            s = np.where(allowed[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // G]
    return out


def random_documents(rng, B, T):
    """Segment ids of documents of random lengths and positions restarting at each."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=2, replace=False))
        seg[b, cuts[0] :] += 1
        seg[b, cuts[1] :] += 1
    starts = np.array([[np.argmax(seg[b] == seg[b, t]) for t in range(T)] for b in range(B)])
    return seg, (np.arange(T) - starts).astype(np.int32)


@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("window, docs, softcap", [(3, False, 0.0), (0, True, 0.0), (4, True, 2.0), (0, False, 2.0)])
def test_window_document_and_softcap_attention_match_numpy_with_gradients(blocks, window, docs, softcap):
    B, T, N, K, H = 2, 11, 4, 2, 8
    rng = np.random.default_rng(window + 10 * docs)
    q, k, v = (rng.normal(size=(B, T, n, H)).astype(np.float32) for n in (N, K, K))
    seg, pos = random_documents(rng, B, T) if docs else (None, np.broadcast_to(np.arange(T), (B, T)))
    mask = Mask.self_attention(
        jnp.asarray(pos), None if seg is None else jnp.asarray(seg), window=window, in_order=True
    )
    cfg = dataclasses.replace(CFG, causal_blocks=blocks)
    ours_fn = lambda *a: reference_attention(cfg, *a, mask, softcap=softcap)  # noqa: E731
    got = jax.jit(ours_fn)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    allowed = numpy_mask(pos, pos, seg, seg, window)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, allowed, softcap), rtol=1e-5, atol=1e-5)

    def plain(q, k, v):  # autodiff of the formula, K/V repeated per group
        s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, 2), precision="highest") / np.sqrt(H)
        s = softcap * jnp.tanh(s / softcap) if softcap else s
        p = jax.nn.softmax(jnp.where(jnp.asarray(allowed)[:, None], s, -1e30), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", p, jnp.repeat(v, N // K, 2), precision="highest")

    w = rng.normal(size=(B, T, N, H)).astype(np.float32)
    ours = jax.jit(jax.grad(lambda *a: jnp.sum(w * ours_fn(*a)), (0, 1, 2)))
    want = jax.jit(jax.grad(lambda *a: jnp.sum(w * plain(*a)), (0, 1, 2)))
    for g, r in zip(ours(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_documents_start_at_each_end_of_document_token():
    tokens = np.array([[5, 9, 0, 3, 4, 0, 0, 7], [0, 1, 2, 3, 0, 5, 6, 7]])
    segments, positions = documents(jnp.asarray(tokens), eod_id=0)
    want_seg, want_pos = np.zeros_like(tokens), np.zeros_like(tokens)
    for b, row in enumerate(tokens):
        seg = start = 0
        for t, token in enumerate(row):
            if token == 0:
                seg, start = seg + 1, t
            want_seg[b, t], want_pos[b, t] = seg, t - start
    np.testing.assert_array_equal(segments, want_seg)
    np.testing.assert_array_equal(positions, want_pos)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_a_document_masked_window_scores_each_document_as_if_alone(position):
    """The training inputs with document masking: the logits of a window holding two documents are those of each
    document run on its own (an independent reference: nothing crosses, positions restart)."""
    cfg = dataclasses.replace(CFG, position=position, sliding_window=5, global_every=2)  # a local, a global layer
    variables, eod = init(cfg), 0
    rng = np.random.default_rng(1)
    docs = rng.integers(1, cfg.vocab_size, (2, 7))  # each longer than the window
    window = np.concatenate([[eod], docs[0], [eod], docs[1], [eod]])[None].astype(np.int32)  # [1, T + 1]
    inputs = jax.jit(lambda w: Inputs(eod_id=eod)(w, Transformer(cfg), variables, mutable=["state"]))
    (out, _), targets = inputs(jnp.asarray(window))
    alone = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(np.pad(docs, ((0, 0), (1, 0)))))  # each alone
    np.testing.assert_allclose(out.logits_BTV[0, :8], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits_BTV[0, 8:], alone[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(targets, window[:, 1:])


# ------------------------------------------------------------------------------------- QK-norm and soft-caps


def numpy_rope(x, positions, theta=10_000.0):
    H = x.shape[-1]
    freq = theta ** (-np.arange(0, H, 2) / H)
    angle = positions[..., None, None] * freq
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def test_qk_norm_is_a_per_head_rmsnorm_before_rope():
    cfg = dataclasses.replace(CFG, qk_norm=True)
    B, T = 2, 7
    x = np.random.default_rng(0).normal(size=(B, T, cfg.d_model)).astype(np.float32)
    mask = Mask.self_attention(jnp.broadcast_to(jnp.arange(T), (B, T)), in_order=True)
    params = nn.unbox(jax.jit(GQA(cfg).init)(jax.random.key(0), jnp.asarray(x), mask)["params"])
    rng = np.random.default_rng(1)
    params["q_norm"]["scale"] = rng.uniform(0.5, 2, cfg.resolved_head_dim).astype(np.float32)
    params["k_norm"]["scale"] = rng.uniform(0.5, 2, cfg.resolved_head_dim).astype(np.float32)
    got, _ = jax.jit(GQA(cfg).apply)({"params": params}, jnp.asarray(x), mask)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    norm = lambda y, w: y / np.sqrt(np.mean(y * y, -1, keepdims=True) + cfg.norm_eps) * w  # noqa: E731
    q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"])
    k = np.einsum("btd,dkh->btkh", x, p["key"]["kernel"])
    v = np.einsum("btd,dkh->btkh", x, p["value"]["kernel"])
    positions = np.broadcast_to(np.arange(T), (B, T))
    q = numpy_rope(norm(q, p["q_norm"]["scale"]), positions)
    k = numpy_rope(norm(k, p["k_norm"]["scale"]), positions)
    o = numpy_attention(q, k, v, numpy_mask(positions, positions))
    want = np.einsum("btnh,nhd->btd", o, p["out"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rope_scaling_reaches_the_rotation():
    """Linear scaling by f rotates position p as plain RoPE rotates p / f; YaRN scales cos and sin by its factor."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 2, 8)), jnp.float32)
    positions = jnp.arange(0, 12, 2)[None]
    linear = dataclasses.replace(CFG, rope_scaling=RopeScaling(type="linear", factor=2.0))
    np.testing.assert_allclose(rope(linear, x, positions), apply_rope(x, positions / 2, CFG.rope_theta), atol=1e-5)
    yarn = dataclasses.replace(CFG, rope_scaling=YARN)
    norms = np.linalg.norm(rope(yarn, x, positions), axis=-1) / np.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(norms, attention_factor(YARN), rtol=1e-5)
    assert attention_factor(YARN) > 1


def test_final_logit_softcap_is_cap_tanh_of_the_uncapped_logits():
    plain = dataclasses.replace(CFG, tie_embeddings=False)
    variables = init(plain)
    variables["params"]["head"]["kernel"] = variables["params"]["head"]["kernel"] * 40  # logits large: the cap bites
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)))
    raw = np.asarray(jax.jit(Transformer(plain).apply)(variables, tokens), np.float64)
    got = jax.jit(Transformer(dataclasses.replace(plain, final_logit_softcap=2.0)).apply)(variables, tokens)
    np.testing.assert_allclose(got, 2.0 * np.tanh(raw / 2.0), rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() <= 2.0 < np.abs(raw).max()


def test_the_cpu_kernel_says_which_mask_parts_it_does_not_run():
    assert "sliding_window" in cpu_kernel_blocker(dataclasses.replace(CFG, sliding_window=4))
    assert "document_mask" in cpu_kernel_blocker(CFG, documents=True)
    assert "softcap" in cpu_kernel_blocker(dataclasses.replace(CFG, attn_logit_softcap=5.0))


# ----------------------------------------------------------------------------------------------- decoding


def distinct_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(vocab_size)[:n].tolist() for n in lengths]


def greedy_against_recomputation(cfg, params, prompts, steps, max_len, reference_cfg=None, variant=""):
    """Greedy decoding through the cache (left-padded prompts prefilled, then one token per step), each step's logits
    against one forward pass of `reference_cfg` (default `cfg`) without a cache over the prompts and their
    continuations. Checks the picks vary: a row repeating one token proves little, and a freshly initialised model
    with tied embeddings does just that, echoing its last token (so callers untie them). `variant`: the attention
    kind's decode variant (DecodeConfig.attention). Returns the tokens [B, N]."""
    model, step = decoder(cfg, 0, variant)
    apply = functools.partial(step, unstack_layers(params, cfg))
    tokens_BP, positions_BP = left_pad(prompts)
    B, P = tokens_BP.shape
    logits_BTV, v = apply(jax.jit(lambda: init_cache(model, B, max_len))(), tokens_BP, positions_BP)
    logits, tokens, position_B = [logits_BTV[:, -1]], [], positions_BP[:, -1]
    for i in range(steps):
        tokens.append(np.asarray(jnp.argmax(logits[-1], -1)))
        if i < steps - 1:
            position_B = position_B + 1
            logits_BTV, v = apply(v["cache"], tokens[-1][:, None], position_B[:, None])
            logits.append(logits_BTV[:, 0])
    tokens_BN = np.stack(tokens, 1)
    all_tokens = np.concatenate([tokens_BP, tokens_BN], 1)
    all_positions = np.concatenate([positions_BP, positions_BP[:, -1:] + 1 + np.arange(steps)], 1)
    full_BNV = forward(reference_cfg or cfg)({"params": params}, all_tokens, all_positions)[:, P - 1 : P - 1 + steps]
    np.testing.assert_allclose(jnp.stack(logits, 1), full_BNV, rtol=1e-4, atol=1e-4)
    assert all(len(set(row)) >= 3 for row in tokens_BN.tolist()), tokens_BN
    return tokens_BN


def test_greedy_decoding_with_the_cache_equals_recomputation_with_every_option():
    cfg = dataclasses.replace(CFG, **ALL_OPTIONS, tie_embeddings=False)
    prompts = distinct_prompts(cfg.vocab_size, [7, 2, 11])  # left-padded, longer than the window
    greedy_against_recomputation(cfg, init(cfg)["params"], prompts, 12, max_len=28)


@functools.cache
def forward(cfg):
    return jax.jit(Transformer(cfg).apply)


@functools.cache
def decoder(cfg, max_rewind, variant=""):
    """The decoding model of `cfg` and its jitted step (params, cache, tokens, positions), compiled once per shape
    for every call of decode_logits with this config."""
    rt = Runtime.decoding(DecodeConfig(attention=variant, max_rewind=max_rewind))
    model = Transformer(dataclasses.replace(cfg, scan_layers=False), rt)
    step = jax.jit(lambda prm, c, t, p: model.apply({"params": prm, "cache": c}, t, p, mutable=["cache"]))
    return model, step


def decode_logits(cfg, params, tokens_BT, max_len, max_rewind=0, prefill=6, variant=""):
    """Prefill the first `prefill` tokens, then feed the rest one by one: each step's logits [B, T - prefill, V]."""
    model, step = decoder(cfg, max_rewind, variant)
    apply = functools.partial(step, unstack_layers(params, cfg))
    cache = jax.jit(lambda: init_cache(model, tokens_BT.shape[0], max_len))()
    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, v = apply(cache, tokens_BT[:, :prefill], positions[:, :prefill])
    out, cache = [logits[:, -1]], v["cache"]
    for t in range(prefill, T - 1):
        logits, v = apply(cache, tokens_BT[:, t : t + 1], positions[:, t : t + 1])
        out.append(logits[:, 0])
        cache = v["cache"]
    return jnp.stack(out, 1), cache, (apply, positions)


def test_the_rolling_window_cache_equals_the_full_cache_and_recomputation():
    cfg = dataclasses.replace(CFG, sliding_window=3, global_every=2)
    params = init(cfg)["params"]
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)))
    rolling, cache, _ = decode_logits(cfg, params, tokens, max_len=16)
    full, full_cache, _ = decode_logits(cfg, params, tokens, max_len=16, max_rewind=16)
    sizes = {x.pos_BS.shape[1] for x in jax.tree.leaves(cache, is_leaf=lambda x: hasattr(x, "pos_BS"))}
    assert sizes == {3, 16}  # local layers keep the window, global ones the whole sequence
    assert {x.pos_BS.shape[1] for x in jax.tree.leaves(full_cache, is_leaf=lambda x: hasattr(x, "pos_BS"))} == {16}
    recomputed = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)[:, 5:15]
    np.testing.assert_allclose(rolling, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rolling, recomputed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_rewind", [3, 16])  # a rolling window cache with 3 spare slots, a full one
def test_rewinding_a_row_and_decoding_again_equals_never_having_written_it(max_rewind):
    cfg = dataclasses.replace(CFG, sliding_window=3)
    params = init(cfg)["params"]
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 15))
    # Both rows write positions 0..12; then row 0 forgets 9..12 and row 1 forgets 12, and each writes other tokens.
    _, cache, (apply, _) = decode_logits(cfg, params, jnp.asarray(tokens[:, :14]), 16, max_rewind, prefill=6)
    cache = rewind(cache, jnp.asarray([9, 12]))
    redo = tokens.copy()
    redo[0, 9:11], redo[1, 12:14] = rng.integers(0, cfg.vocab_size, (2, 2))
    fresh, _, _ = decode_logits(cfg, params, jnp.asarray(redo), 16, max_rewind, prefill=6)  # logits of 5..13
    for step in range(2):
        at = np.array([9 + step, 12 + step])
        logits, v = apply(cache, jnp.asarray(redo[[0, 1], at])[:, None], jnp.asarray(at)[:, None])
        cache = v["cache"]
        for row in range(2):
            np.testing.assert_allclose(logits[row, 0], fresh[row, at[row] - 5], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- per-layer patterns


@pytest.mark.parametrize(
    "changes, shape",
    [
        ({}, [(1, 2)]),
        ({"num_layers": 8, "sliding_window": 4, "global_every": 4}, [(4, 2)]),
        ({"num_layers": 10, "sliding_window": 4, "global_every": 4}, [(4, 2), (1, 2)]),
        ({"num_layers": 4, "sliding_window": 4, "global_every": 4}, [(1, 3), (1, 1)]),
        ({"num_layers": 6, "sliding_window": 4}, [(1, 6)]),
    ],
)
def test_layer_patterns_group_into_scanned_repeats(changes, shape):
    cfg = dataclasses.replace(CFG, **changes)
    groups = layer_groups(cfg)
    assert [(len(g.unit), g.repeats) for g in groups] == shape
    assert [s.window for g in groups for _ in range(g.repeats) for s in g.unit] == [
        cfg.window_of(i) for i in range(cfg.num_layers)
    ]
    assert [g.name for g in groups] == (["layers"] if len(groups) == 1 else [f"layers_{i}" for i in range(len(groups))])


def test_a_mixed_stack_scans_each_group_once_and_matches_the_unrolled_stack():
    cfg = dataclasses.replace(CFG, num_layers=8, sliding_window=4, global_every=3, **{"qk_norm": True})
    variables = init(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    jaxpr = str(jax.make_jaxpr(lambda v: Transformer(cfg).apply(v, tokens))(variables))
    assert [(len(g.unit), g.repeats) for g in layer_groups(cfg)] == [(3, 2), (1, 2)]  # LLG LLG, then L L
    assert jaxpr.count(" scan[") == 2  # two groups, each compiled once whatever its repeats
    loop = dataclasses.replace(cfg, scan_layers=False)
    flat = unstack_layers(variables["params"], cfg)
    assert sorted(k for k in flat if k.startswith("layer_")) == sorted(f"layer_{i}" for i in range(8))
    np.testing.assert_allclose(
        jax.jit(Transformer(loop).apply)({"params": flat}, tokens),
        jax.jit(Transformer(cfg).apply)(variables, tokens),
        atol=1e-6,
    )


@pytest.mark.parametrize("changes", [{}, ALL_OPTIONS, {"mlp": "toy", "num_layers": 3}, {"norm": "layernorm"}])
def test_param_counts_match_the_initialised_params(changes):
    cfg = dataclasses.replace(CFG, **changes)
    params = nn.unbox(jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0))))["params"]
    counts = param_counts(cfg)
    assert counts.total == sum(x.size for x in jax.tree.leaves(params))
    assert counts.active == counts.total  # dense: every weight is used by every token


def test_sliding_window_layers_count_attention_over_the_window():
    cfg = dataclasses.replace(CFG, num_layers=4, sliding_window=8, global_every=2)
    per_layer = 4 * cfg.num_heads * cfg.resolved_head_dim
    assert attention_flops_per_token(cfg, 64) == per_layer * (8 + 64 + 8 + 64)
    assert attention_flops_per_token(cfg, 4) == per_layer * 4 * 4  # a window longer than the sequence


# ------------------------------------------------------------------------- auxiliary terms and model state


def test_aux_terms_are_added_with_their_weight_and_logged_and_state_follows_its_rule():
    run = tiny_run(model={"mlp": "toy"}, train={"grad_accum": 2})
    cfg = dataclasses.replace(run.model, vocab_size=50)
    model = Transformer(cfg)
    tx, schedule = make_optimizer(run.train, cfg)
    state = init_state(model, tx, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, cfg.max_seq_len + 1)), jnp.int32)
    new, metrics = jax.jit(make_train_step(model, tx, schedule, run.train))(state, {"tokens": tokens})

    # train/loss is the main head's cross-entropy; the gradient is that of loss + weight * aux.
    @jax.jit
    def parts(params, tokens):
        (out, _), targets = Inputs()(tokens, model, {"params": params, "state": state.model_state}, mutable=["state"])
        return jnp.mean(cross_entropy(out.logits_BTV, targets)[0]), out.aux["toy_aux"].value

    halves = [tokens[0::2], tokens[1::2]]  # micro-batch a takes rows a, a + A, ...
    ce, aux = np.mean([parts(state.params, h) for h in halves], axis=0)
    np.testing.assert_allclose(metrics["train/loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["train/toy_aux"], aux, rtol=1e-5)
    total = lambda p: sum(c + tests.toy_kinds.AUX_WEIGHT * a for c, a in (parts(p, h) for h in halves)) / 2  # noqa: E731
    np.testing.assert_allclose(
        metrics["train/grad_norm"], optax_norm(jax.jit(jax.grad(total))(state.params)), rtol=1e-4
    )
    # The state moved by its rule (the mean of the micro-batches' updates) and is not a parameter.
    old, moved = (jax.tree.leaves(s)[0] for s in (state.model_state, new.model_state))
    assert not np.allclose(old, moved) and "input_mean" not in str(jax.tree_util.tree_structure(new.params))


def optax_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


# ------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "group, values, match",
    [
        ("model", {"sliding_window": -1}, "model.sliding_window=-1: must be >= 0"),
        ("model", {"global_every": 2}, "model.global_every=2: needs model.sliding_window > 0"),
        ("model", {"attention": "bogus"}, "model.attention='bogus': allowed: gqa"),
        (
            "model",
            {"attention_impl": "bogus"},
            "model.attention_impl='bogus': allowed: auto, xla, cpu_kernel, pallas, cudnn",
        ),
        ("model", {"attn_logit_softcap": -1.0}, "model.attn_logit_softcap=-1.0: must be >= 0"),
        ("model", {"rope_scaling": {"type": "bogus"}}, "model.rope_scaling.type='bogus': one of 'none', 'linear'"),
    ],
)
def test_bad_variant_values_are_one_line_config_errors(group, values, match):
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=match):
        resolve(tiny_config(**{group: values}))


def test_a_bad_variant_value_on_the_command_line_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "train.py", f"--workdir={tmp_path}/run", "--config.model.global_every=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "model.global_every=2: needs model.sliding_window > 0" in done.stderr
    assert not (tmp_path / "run").exists()
