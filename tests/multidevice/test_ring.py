"""Ring attention against a plain causal attention written here, on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from parallel.ring import ring_attention, zigzag_order

B, T, N, K, H = 2, 32, 4, 2, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def make_mesh(**sizes):
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def reference_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, bias_BNTS=None):
    """Textbook causal attention with K/V repeated per query head."""
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSNH, v_BSNH = jnp.repeat(k_BSKH, G, axis=2), jnp.repeat(v_BSKH, G, axis=2)
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / np.sqrt(q_BTNH.shape[-1])
    if bias_BNTS is not None:
        logits_BNTS = logits_BNTS + bias_BNTS
    mask_BTS = (k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]) & (k_pos_BS[:, None, :] >= 0)
    probs_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], logits_BNTS, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH)


def alibi_like(q_pos_BT, k_pos_BS):
    slopes_N = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    distance_BTS = (k_pos_BS[:, None, :] - q_pos_BT[:, :, None]).astype(jnp.float32)
    return slopes_N[None, :, None, None] * distance_BTS[:, None]


def random_qkv(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    cotangent = jax.random.normal(keys[3], (B, T, N, H))
    return q, k, v, cotangent


def layout(name, num_shards):
    """Slot -> original position for a layout; positions are these indices."""
    return zigzag_order(T, num_shards) if name == "zigzag" else np.arange(T, dtype=np.int32)


def run_ring(mesh, order, q, k, v, **kwargs):
    """Ring attention on the permuted sequence, output returned in the original order."""
    positions_BT = jnp.broadcast_to(jnp.asarray(order), (B, T))
    fn = jax.jit(
        lambda q, k, v: ring_attention(q[:, order], k[:, order], v[:, order], positions_BT, mesh=mesh, **kwargs)
    )
    return fn(q, k, v)[:, np.argsort(order)]


def natural_reference(q, k, v, bias_fn=None):
    pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return reference_attention(q, k, v, pos_BT, pos_BT, None if bias_fn is None else bias_fn(pos_BT, pos_BT))


MESHES = {"seq4_data2": dict(data=2, sequence=4), "seq8": dict(sequence=8)}


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous"])
def test_forward_matches_reference(mesh_name, layout_name):
    mesh = make_mesh(**MESHES[mesh_name])
    q, k, v, _ = random_qkv()
    out = run_ring(mesh, layout(layout_name, mesh.shape["sequence"]), q, k, v)
    np.testing.assert_allclose(out, natural_reference(q, k, v), **TOL)


def assert_grads_match(mesh, order, seed, bias_fn=None):
    q, k, v, cotangent = random_qkv(seed)
    ring_loss = lambda *qkv: jnp.sum(run_ring(mesh, order, *qkv, bias_fn=bias_fn) * cotangent)
    ref_loss = lambda *qkv: jnp.sum(natural_reference(*qkv, bias_fn) * cotangent)
    ring_grads = jax.jit(jax.grad(ring_loss, argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    for ring_grad, ref_grad in zip(ring_grads, ref_grads):
        np.testing.assert_allclose(ring_grad, ref_grad, **TOL)


@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous"])
def test_gradients_match_reference(layout_name):
    assert_grads_match(make_mesh(data=2, sequence=4), layout(layout_name, 4), seed=1)


def test_bias_fn_matches_reference():
    mesh = make_mesh(data=2, sequence=4)
    q, k, v, _ = random_qkv(2)
    out = run_ring(mesh, zigzag_order(T, 4), q, k, v, bias_fn=alibi_like)
    np.testing.assert_allclose(out, natural_reference(q, k, v, alibi_like), **TOL)


def test_heads_sharded_over_tensor_axis():
    """Each tensor shard holds one K/V head, its two query heads and their slice of the bias."""
    mesh = make_mesh(data=2, sequence=2, tensor=2)
    q, k, v, _ = random_qkv(3)
    out = run_ring(mesh, zigzag_order(T, 2), q, k, v, bias_fn=alibi_like)
    np.testing.assert_allclose(out, natural_reference(q, k, v, alibi_like), **TOL)
    assert_grads_match(mesh, zigzag_order(T, 2), seed=3, bias_fn=alibi_like)


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
            out_BTNH = ring_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, mesh=mesh)
            return x_BTD + nn.DenseGeneral(x_BTD.shape[-1], axis=(-2, -1), name="o")(out_BTNH), None

    Stack = nn.scan(
        nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=2
    )
    x_BTD = jax.random.normal(jax.random.key(4), (B, T, 16))
    positions_BT = jnp.broadcast_to(jnp.asarray(order), (B, T))
    with jax.set_mesh(mesh):
        x_BTD = jax.device_put(x_BTD, NamedSharding(mesh, P("data", "sequence")))
        params = jax.jit(Stack().init)(jax.random.key(5), x_BTD, positions_BT)

        @jax.jit
        def loss_and_grads(params):
            return jax.value_and_grad(lambda p: jnp.mean(Stack().apply(p, x_BTD, positions_BT)[0] ** 2))(params)

        loss, grads = loss_and_grads(params)
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def work_counts(order, num_shards):
    mesh = make_mesh(sequence=num_shards)
    q, k, v, _ = random_qkv()
    positions_BT = jnp.broadcast_to(jnp.asarray(order), (B, T))
    _, work = jax.jit(lambda *a: ring_attention(*a, mesh=mesh, return_work=True))(q, k, v, positions_BT)
    return np.asarray(work)


def test_zigzag_balances_work():
    n = 8
    np.testing.assert_array_equal(work_counts(zigzag_order(T, n), n), [2 * n + 1] * n)


def test_contiguous_layout_overloads_last_shard():
    n = 8
    work = work_counts(np.arange(T, dtype=np.int32), n)
    assert work[0] == 3 and work[-1] == 4 * n - 1 and work.argmax() == n - 1
    assert work.sum() == n * (2 * n + 1)  # the same total work, badly spread


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
