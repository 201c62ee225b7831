"""The hooks object (model/runtime.py's `Hooks`): every collective the model needs on a mesh, built here, where the
mesh is known, and handed to the model in its `Runtime`.

- Attention the mesh imposes (`attention_for`). With the sequence split (mesh.sequence > 1) it is ring attention
  (parallel/ring.py), whatever `model.attention_impl` names (the ring's per-block math is plain JAX, not a kernel).
  Otherwise, on several devices, an implementation that is one device's program (`Implementation.per_device`: the
  Pallas kernels) runs inside `jax.shard_map`, each device on its own batch rows (the `batch` rule's axes) and heads
  (the `heads` rule's axes, for query and K/V heads alike, so a GQA group never straddles devices), with the mask's
  rows and the bias's heads (ALiBi's slopes) cut to match; the sequence stays whole.
- The experts' all-to-all (parallel/expert.py) when the mesh splits MoE experts over devices.
- Later, pipeline stages.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from model import ModelConfig
from model.attention import IMPLEMENTATIONS, Implementation, choose
from model.runtime import Hooks
from parallel.expert import expert_parallel
from parallel.mesh import MeshError, mesh_axes
from parallel.ring import ring_attention

if TYPE_CHECKING:  # parallel/layout.py imports this module
    from parallel.layout import Layout


def ring_implementation(layout: Layout) -> Implementation:
    """Ring attention over the layout's sequence axis, as an attention implementation (parallel/ring.py)."""
    ring = functools.partial(
        ring_attention,
        mesh=layout.mesh,
        axis="sequence",
        batch_axes=mesh_axes(layout.rules["batch"]),
        head_axes=mesh_axes(layout.rules["heads"]),
    )
    # The ring runs every part of the mask (window, documents, padding), soft-caps, biases and its own scale.
    return Implementation(blocker=lambda cfg, documents=False: None, attend=lambda cfg, *args, **kw: ring(*args, **kw))


class _HeadShard:
    """A bias function over all heads as one device of a head-sharded mesh sees it: its `count` heads from
    `offset` on, and ALiBi's `slopes` of those heads for kernels that add the bias themselves."""

    def __init__(self, full, offset: jax.Array, count: int):
        self.full, self.offset, self.count = full, offset, count

    def __call__(self, q_positions_BT: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
        bias_BNTS = self.full(q_positions_BT, k_positions_BS)
        return jax.lax.dynamic_slice_in_dim(bias_BNTS, self.offset, self.count, axis=1)

    @property
    def slopes(self) -> jax.Array:
        slopes_N = jnp.asarray(self.full.slopes, jnp.float32)
        return jax.lax.dynamic_slice_in_dim(slopes_N, self.offset, self.count)


def _sharding_axes(layout: Layout, logical: str) -> tuple[str, ...]:
    """The mesh axes of a logical name that split something here (size-1 axes drop out)."""
    return tuple(a for a in mesh_axes(layout.rules[logical]) if layout.mesh.shape[a] > 1)


def head_shards(layout: Layout) -> int:
    return math.prod(layout.mesh.shape[a] for a in _sharding_axes(layout, "heads"))


def per_device_implementation(impl: Implementation, layout: Layout) -> Implementation:
    """`impl.attend` run by every device on its own batch rows and heads (`jax.shard_map`): q, k and v split
    along batch over the `batch` rule's axes and along heads over the `heads` rule's axes, the mask by rows, the
    bias by heads; the sequence whole. Decoding keeps `impl.decode` (on a mesh, XLA gathers its inputs)."""
    mesh, batch, heads = layout.mesh, _sharding_axes(layout, "batch"), _sharding_axes(layout, "heads")
    shards = head_shards(layout)
    x_spec = PartitionSpec(batch or None, None, heads or None, None)

    def attend(cfg, q_BTNH, k_BSKH, v_BSKH, mask, *, bias_fn=None, softcap=0.0, scale=None):
        N, K = q_BTNH.shape[2], k_BSKH.shape[2]
        if N % shards or K % shards:
            raise ValueError(f"{N} query heads and {K} K/V heads do not both split over {shards} head shards")

        def local(q_BTNH, k_BSKH, v_BSKH, mask):
            index = jnp.int32(0)  # this device's head shard, numbered row-major as PartitionSpec lays them out
            for name in heads:
                index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
            bias = None if bias_fn is None else _HeadShard(bias_fn, index * (N // shards), N // shards)
            return impl.attend(cfg, q_BTNH, k_BSKH, v_BSKH, mask, bias_fn=bias, softcap=softcap, scale=scale)

        # check_vma off: under check_vma=True a pallas_call's outputs must say how they vary over the mesh axes,
        # which the kernels' ShapeDtypeStructs do not.
        return jax.shard_map(
            local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, PartitionSpec(batch or None)), out_specs=x_spec,
            check_vma=False,
        )(q_BTNH, k_BSKH, v_BSKH, mask)  # fmt: skip

    return Implementation(impl.blocker, attend, impl.decode)


def attention_for(cfg: ModelConfig, layout: Layout) -> Implementation | None:
    """The attention implementation the layout imposes (None: the one the model config chooses): ring attention
    when the sequence is split, the per-device kernel `cfg.attention_impl` names on each device's shard when
    there are several devices."""
    if layout.sequence_shards > 1:
        return ring_implementation(layout)
    named = IMPLEMENTATIONS.get(cfg.attention_impl)
    if named is not None and named.per_device and layout.mesh.size > 1:
        return per_device_implementation(named, layout)
    return None


def check_attention(m: ModelConfig, documents: bool, layout: Layout) -> None:
    """MeshError (one line) when the model's attention (`documents`: with document masks) cannot run on this layout
    and backend."""
    imposed = attention_for(m, layout)
    if layout.sequence_shards > 1:
        if (reason := imposed.blocker(m, documents)) is not None:
            raise MeshError(f"mesh.sequence={layout.sequence_shards}: ring attention cannot run this model: {reason}")
        return
    try:
        choose(m, documents)
    except ValueError as e:
        raise MeshError(str(e)) from None
    if imposed is not None and (m.num_heads % head_shards(layout) or m.num_kv_heads % head_shards(layout)):
        raise MeshError(
            f"model.attention_impl={m.attention_impl!r} runs per device on whole heads: model.num_heads={m.num_heads} "
            f"and model.num_kv_heads={m.num_kv_heads} must both divide over the {head_shards(layout)} shards of "
            f"mesh.rules.heads={layout.rules['heads']!r}"
        )


def hooks_for(cfg: ModelConfig, layout: Layout) -> Hooks:
    """The collectives the model needs on this layout: the attention it imposes (`attention_for`), and when the
    mesh splits experts, the all-to-all that moves MoE assignments to their experts' devices (parallel/expert.py)."""
    experts = None
    if layout.mesh.shape["expert"] > 1:
        experts = expert_parallel(layout.mesh, mesh_axes(layout.rules["batch"]))
    return Hooks(attention=attention_for(cfg, layout), experts=experts)
