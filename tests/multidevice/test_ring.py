"""Ring attention against a brute-force attention written here (its mask built by explicit loops), on 8 fake CPU
devices: causal, sliding window, documents with restarting positions, padding, soft-capping, GQA/MQA, a value
head dim of its own, and the block skipping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from model.mask import Mask
from parallel.ring import _fully_masked, _Tokens, ring_attention, zigzag_order

B, T, N, K, H = 2, 32, 4, 2, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def make_mesh(**sizes):
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def reference_mask(q_pos_BT, k_pos_BS, q_seg_BT=None, k_seg_BS=None, window=0) -> np.ndarray:
    """[B, T, S] bool, one pair at a time: a real key, not after the query, inside the window, same document."""
    q_pos_BT, k_pos_BS = np.asarray(q_pos_BT), np.asarray(k_pos_BS)
    allowed = np.zeros((q_pos_BT.shape[0], q_pos_BT.shape[1], k_pos_BS.shape[1]), bool)
    for b in range(allowed.shape[0]):
        for t in range(allowed.shape[1]):
            for s in range(allowed.shape[2]):
                qp, kp = q_pos_BT[b, t], k_pos_BS[b, s]
                ok = 0 <= kp <= qp and (window == 0 or qp - kp < window)
                if q_seg_BT is not None:
                    ok = ok and q_seg_BT[b, t] == k_seg_BS[b, s]
                allowed[b, t, s] = ok
    return allowed


def reference_attention(q_BTNH, k_BSKH, v_BSKV, allowed_BTS, bias_BNTS=None, softcap=0.0, scale=None):
    """Textbook attention with K/V repeated per query head; a query that sees nothing outputs 0."""
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSNH, v_BSNV = jnp.repeat(k_BSKH, G, axis=2), jnp.repeat(v_BSKV, G, axis=2)
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) * scale
    if softcap:
        logits_BNTS = softcap * jnp.tanh(logits_BNTS / softcap)
    if bias_BNTS is not None:
        logits_BNTS = logits_BNTS + bias_BNTS
    allowed_B1TS = jnp.asarray(allowed_BTS)[:, None]
    probs_BNTS = jax.nn.softmax(jnp.where(allowed_B1TS, logits_BNTS, -1e30), axis=-1)
    probs_BNTS = jnp.where(allowed_B1TS.any(axis=-1, keepdims=True), probs_BNTS, 0.0)
    return jnp.einsum("bnts,bsnv->btnv", probs_BNTS, v_BSNV)


def alibi_like(q_pos_BT, k_pos_BS):
    slopes_N = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    distance_BTS = (k_pos_BS[:, None, :] - q_pos_BT[:, :, None]).astype(jnp.float32)
    return slopes_N[None, :, None, None] * distance_BTS[:, None]


def random_qkv(seed=0, num_kv_heads=K, value_dim=H):
    """From NumPy's generator: JAX's would compile a random program for every shape."""
    rng = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, T, num_kv_heads, H), (B, T, num_kv_heads, value_dim), (B, T, N, value_dim)]
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
    return q, k, v, cotangent


def documents(seed, shuffled_ids=False, pad_last=0):
    """(positions, segment ids) [B, T] in natural order: random document lengths, positions restarting at 0 at
    each document; `shuffled_ids` labels documents in no particular order; the last `pad_last` tokens of row 1
    are padding (position -1)."""
    rng = np.random.default_rng(seed)
    positions, segments = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        starts = np.sort(rng.choice(np.arange(1, T), size=4, replace=False))
        labels = rng.permutation(10)[:5] if shuffled_ids else np.arange(5)
        doc = np.searchsorted(starts, np.arange(T), side="right")
        segments[b] = labels[doc]
        positions[b] = np.arange(T) - np.concatenate([[0], starts])[doc]
    if pad_last:
        positions[1, -pad_last:] = -1
    return positions, segments


def natural_positions():
    return np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))


def layout(name, num_shards):
    """Slot -> original position for a layout."""
    return zigzag_order(T, num_shards) if name == "zigzag" else np.arange(T, dtype=np.int32)


def ring_fn(mesh, order, positions_BT, segments_BT=None, window=0, **kwargs):
    """q, k, v (natural order) -> ring attention's output in natural order, computed on the permuted sequence."""
    pos_BT = jnp.asarray(positions_BT)[:, order]
    seg_BT = None if segments_BT is None else jnp.asarray(segments_BT)[:, order]
    mask = Mask.self_attention(pos_BT, seg_BT, window=window)
    inverse = np.argsort(order)
    return lambda q, k, v: ring_attention(q[:, order], k[:, order], v[:, order], mask, mesh=mesh, **kwargs)[:, inverse]


def run_ring(mesh, order, q, k, v):
    return jax.jit(ring_fn(mesh, order, natural_positions()))(q, k, v)


def reference_fn(positions_BT, segments_BT=None, window=0, bias_fn=None, **kwargs):
    allowed_BTS = reference_mask(positions_BT, positions_BT, segments_BT, segments_BT, window)
    bias = None if bias_fn is None else bias_fn(jnp.asarray(positions_BT), jnp.asarray(positions_BT))
    return lambda q, k, v: reference_attention(q, k, v, allowed_BTS, bias, **kwargs)


def natural_reference(q, k, v):
    return jax.jit(reference_fn(natural_positions()))(q, k, v)


def output_and_grads(fn, qkv, cotangent):
    out, vjp = jax.vjp(fn, *qkv)
    return out, vjp(cotangent)


def assert_matches(mesh, order, seed, positions_BT, segments_BT=None, window=0, num_kv_heads=K, value_dim=H, **kw):
    """Output and the gradients of q, k and v against the reference, for one mask and attention variant."""
    q, k, v, cotangent = random_qkv(seed, num_kv_heads, value_dim)
    ring = ring_fn(mesh, order, positions_BT, segments_BT, window, **kw)
    ring_out, ring_grads = jax.jit(lambda *qkv: output_and_grads(ring, qkv, cotangent))(q, k, v)
    reference = reference_fn(positions_BT, segments_BT, window, **kw)  # jitted too: eagerly each op compiles alone
    ref_out, ref_grads = jax.jit(lambda *qkv: output_and_grads(reference, qkv, cotangent))(q, k, v)
    np.testing.assert_allclose(ring_out, ref_out, **TOL)
    for ring_grad, ref_grad in zip(ring_grads, ref_grads):
        np.testing.assert_allclose(ring_grad, ref_grad, **TOL)


@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous"])
def test_forward_on_8_sequence_shards_matches_reference(layout_name):
    """8 shards of 4 tokens, no data axis (on (data 2 x sequence 4) every assert_matches checks the forward too)."""
    mesh = make_mesh(sequence=8)
    q, k, v, _ = random_qkv()
    out = run_ring(mesh, layout(layout_name, 8), q, k, v)
    np.testing.assert_allclose(out, natural_reference(q, k, v), **TOL)


@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous"])
def test_gradients_match_reference(layout_name):
    assert_matches(make_mesh(data=2, sequence=4), layout(layout_name, 4), 1, natural_positions())


@pytest.mark.parametrize("window", [3, 12])
def test_sliding_window(window):
    """3 is under the 4-token chunk (most pairs are skipped), 12 spans several chunks."""
    assert_matches(make_mesh(data=2, sequence=4), zigzag_order(T, 4), 6, natural_positions(), window=window)


@pytest.mark.parametrize("shuffled_ids", [False, True], ids=["ordered_ids", "shuffled_ids"])
def test_documents_with_restarting_positions_and_padding(shuffled_ids):
    positions_BT, segments_BT = documents(7, shuffled_ids, pad_last=3)
    assert_matches(make_mesh(data=2, sequence=4), zigzag_order(T, 4), 7, positions_BT, segments_BT)


def test_window_and_documents():
    positions_BT, segments_BT = documents(8)
    assert_matches(make_mesh(sequence=8), zigzag_order(T, 8), 8, positions_BT, segments_BT, window=5)


def test_softcap_then_bias_with_own_scale():
    """The cap acts on the scaled logits, the bias is added after it (Gemma 2's order)."""
    mesh = make_mesh(data=2, sequence=4)
    assert_matches(mesh, zigzag_order(T, 4), 9, natural_positions(), softcap=1.5, scale=0.7, bias_fn=alibi_like)


@pytest.mark.parametrize("num_kv_heads", [1, 4], ids=["mqa", "mha"])
def test_kv_head_counts(num_kv_heads):
    """K = 2 (GQA) runs in every other test."""
    assert_matches(
        make_mesh(data=2, sequence=4), zigzag_order(T, 4), 10, natural_positions(), num_kv_heads=num_kv_heads
    )


def test_value_head_dim_differs_with_heads_sharded():
    mesh = make_mesh(sequence=4, tensor=2)
    positions_BT, segments_BT = documents(11)
    assert_matches(mesh, zigzag_order(T, 4), 11, positions_BT, segments_BT, window=6, value_dim=6, softcap=3.0)


def test_heads_sharded_over_tensor_axis_with_a_bias():
    """Each tensor shard holds one K/V head, its two query heads and their slice of the bias (the bias without a
    softcap; with one, on (data 2 x sequence 4): test_softcap_then_bias_with_own_scale)."""
    mesh = make_mesh(data=2, sequence=2, tensor=2)
    assert_matches(mesh, zigzag_order(T, 2), 3, natural_positions(), bias_fn=alibi_like)


def test_under_set_mesh_in_scanned_remat_flax_layers():
    """The way the model calls it: jitted, under `jax.set_mesh`, inside nn.scan over nn.remat layers."""
    mesh = make_mesh(data=2, sequence=4)
    order = zigzag_order(T, 4)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x_BTD, positions_BT):
            q_BTNH = nn.DenseGeneral((N, H), name="q")(x_BTD)
            k_BTKH = nn.DenseGeneral((K, H), name="k")(x_BTD)
            v_BTKH = nn.DenseGeneral((K, H), name="v")(x_BTD)
            out_BTNH = ring_attention(q_BTNH, k_BTKH, v_BTKH, Mask.self_attention(positions_BT), mesh=mesh)
            return x_BTD + nn.DenseGeneral(x_BTD.shape[-1], axis=(-2, -1), name="o")(out_BTNH), None

    Stack = nn.scan(
        nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=2
    )
    rng = np.random.default_rng(4)
    x_BTD = jnp.asarray(rng.standard_normal((B, T, 16)), jnp.float32)
    positions_BT = jnp.broadcast_to(jnp.asarray(order), (B, T))
    with jax.set_mesh(mesh):
        x_BTD = jax.device_put(x_BTD, NamedSharding(mesh, P("data", "sequence")))
        # Random weights of the initialiser's shapes (its random program would take seconds to compile).
        shapes = jax.eval_shape(Stack().init, jax.random.key(5), x_BTD, positions_BT)
        params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)

        @jax.jit
        def loss_and_grads(params):
            return jax.value_and_grad(lambda p: jnp.mean(Stack().apply(p, x_BTD, positions_BT)[0] ** 2))(params)

        loss, grads = loss_and_grads(params)
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- block skipping


def work_counts(order, num_shards, positions_BT=None, segments_BT=None, window=0):
    """Pairs each shard computed, for a mask given in natural order and laid out by `order`."""
    mesh = make_mesh(sequence=num_shards)
    q, k, v, _ = random_qkv()
    positions_BT = natural_positions() if positions_BT is None else positions_BT
    pos_BT = jnp.asarray(positions_BT)[:, order]
    seg_BT = None if segments_BT is None else jnp.asarray(segments_BT)[:, order]
    mask = Mask.self_attention(pos_BT, seg_BT, window=window)
    attend = jax.jit(lambda q, k, v, mask: ring_attention(q, k, v, mask, mesh=mesh, return_work=True))
    _, work = attend(q[:, order], k[:, order], v[:, order], mask)
    return np.asarray(work)


def needed_pairs(num_shards, allowed_BTS):
    """Per zig-zag shard: the (query chunk, key chunk) pairs in which some row sees some key."""
    n, chunk = num_shards, T // (2 * num_shards)
    seen_CC = allowed_BTS.reshape(B, 2 * n, chunk, 2 * n, chunk).any(axis=(0, 2, 4))
    return np.asarray([seen_CC[[d, 2 * n - 1 - d]].sum() for d in range(n)])


def test_zigzag_balances_work():
    n = 8
    np.testing.assert_array_equal(work_counts(zigzag_order(T, n), n), [2 * n + 1] * n)


def test_contiguous_layout_overloads_last_shard():
    n = 8
    work = work_counts(np.arange(T, dtype=np.int32), n)
    assert work[0] == 3 and work[-1] == 4 * n - 1 and work.argmax() == n - 1
    assert work.sum() == n * (2 * n + 1)  # the same total work, badly spread


def test_window_skips_exactly_the_hidden_pairs():
    n, window = 8, 5
    allowed_BTS = reference_mask(natural_positions(), natural_positions(), window=window)
    work = work_counts(zigzag_order(T, n), n, window=window)
    np.testing.assert_array_equal(work, needed_pairs(n, allowed_BTS))
    assert work.sum() < n * (2 * n + 1)


def test_ordered_documents_skip_exactly_the_hidden_pairs():
    """With restarting positions, position alone would skip little; (document, position) order skips the rest."""
    n = 8
    positions_BT, segments_BT = documents(12)
    allowed_BTS = reference_mask(positions_BT, positions_BT, segments_BT, segments_BT)
    work = work_counts(zigzag_order(T, n), n, positions_BT, segments_BT)
    np.testing.assert_array_equal(work, needed_pairs(n, allowed_BTS))
    assert work.sum() < n * (2 * n + 1)


def test_skipping_never_hides_a_visible_pair():
    """`_fully_masked` on many random small blocks (padding, arbitrary positions and document ids, windows): when
    it skips a block, the brute-force mask hides every pair of it; and each of its rules does skip some blocks."""
    rng = np.random.default_rng(13)
    cases, L = 400, 4
    for window in [0, 2, 5]:
        q_pos_CBL = rng.integers(-1, 12, (cases, 1, L)).astype(np.int32)
        k_pos_CBL = rng.integers(-1, 12, (cases, 1, L)).astype(np.int32)
        for segments in [False, True]:
            q_seg_CBL = rng.integers(0, 3, (cases, 1, L)).astype(np.int32) if segments else None
            k_seg_CBL = rng.integers(0, 3, (cases, 1, L)).astype(np.int32) if segments else None
            hidden_C = jax.jit(
                jax.vmap(lambda qp, kp, qs, ks: _fully_masked(_Tokens(qp, qs), _Tokens(kp, ks), window))
            )(q_pos_CBL, k_pos_CBL, q_seg_CBL, k_seg_CBL)
            hidden_C = np.asarray(hidden_C)
            for c in np.flatnonzero(hidden_C):
                q_seg, k_seg = (q_seg_CBL[c], k_seg_CBL[c]) if segments else (None, None)
                assert not reference_mask(q_pos_CBL[c], k_pos_CBL[c], q_seg, k_seg, window).any(), c
            assert 0 < hidden_C.sum() < cases


def test_zigzag_order_pairs_early_and_late_chunks():
    n, chunk = 4, 3
    order = zigzag_order(2 * n * chunk, n)
    np.testing.assert_array_equal(np.sort(order), np.arange(2 * n * chunk))
    for d, slots in enumerate(order.reshape(n, 2, chunk)):
        np.testing.assert_array_equal(slots[0], np.arange(d * chunk, (d + 1) * chunk))
        np.testing.assert_array_equal(slots[1], np.arange((2 * n - 1 - d) * chunk, (2 * n - d) * chunk))


def test_zigzag_order_rejects_bad_length():
    with pytest.raises(ValueError, match=r"30.*8"):
        zigzag_order(30, 4)


def test_rejects_document_ids_on_one_side_only():
    positions_BT = jnp.asarray(natural_positions())
    mask = Mask(positions_BT, positions_BT, q_segments_BT=jnp.zeros((B, T), jnp.int32))
    q, k, v, _ = random_qkv()
    with pytest.raises(ValueError, match="document ids"):
        ring_attention(q, k, v, mask, mesh=make_mesh(sequence=8))
