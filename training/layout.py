"""Where a run's arrays live: its mesh, the model variant the mesh needs, and the shardings of its variables.

Everything here is decided from the config and the device count, before anything compiles, so a mesh
that does not fit the run fails with a one-line error and nothing on disk touched.

The mesh may impose how attention runs (`attention_for`). With the sequence split (mesh.sequence > 1) it is
ring attention, whatever `model.attention_impl` names (the ring's per-block math is plain JAX, not a kernel).
Otherwise, on several devices, an implementation that is one device's program (`Implementation.per_device`:
the Pallas kernels) runs inside `jax.shard_map`, each device on its own batch rows (the `batch` rule's axes) and
heads (the `heads` rule's axes, for query and K/V heads alike, so a GQA group never straddles devices), with
the mask's rows and the bias's heads (ALiBi's slopes) cut to match; the sequence stays whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import ModelConfig, Transformer, init_variables
from model.attention import IMPLEMENTATIONS, Implementation, choose
from model.runtime import TRAINING, Hooks, Runtime
from parallel import sharding
from parallel.expert import expert_parallel
from parallel.mesh import MeshError, check_divisible, make_mesh, mesh_axes, resolve_sizes
from parallel.ring import ring_attention, zigzag_order
from training.config import ConfigError, RunConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: dict[str, str]

    @property
    def batch(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh, self.rules)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @contextlib.contextmanager
    def activate(self):
        """The context in which the model's logical annotations place activations on this mesh."""
        with sharding.activate(self.mesh, self.rules):
            yield

    @property
    def sequence_shards(self) -> int:
        return self.mesh.shape["sequence"]


def plan(run: RunConfig, devices: list | None = None) -> Layout:
    """The run's mesh over `devices` (default: all global devices); MeshError when it does not fit."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(run.mesh, len(devices))
    m, t, rules = run.model, run.train, run.mesh.rules
    check_divisible(
        {
            "batch": (
                "train.batch_size" if t.grad_accum == 1 else "train.batch_size / train.grad_accum",
                t.batch_size // t.grad_accum,
            ),
            "heads": ("model.num_heads", m.num_heads),
            "kv_heads": ("model.num_kv_heads", m.num_kv_heads),
            # training.config checks a given mesh.expert; this, the one that mesh.expert=-1 takes
            **({"experts": ("model.moe.num_experts", m.moe.num_experts)} if m.mlp == "moe" else {}),
        },
        sizes,
        rules,
    )
    if sizes["sequence"] > 1:
        if mesh_axes(rules["length"]) != ("sequence",):
            raise MeshError(
                f"mesh.sequence={sizes['sequence']} needs mesh.rules.length='sequence', not {rules['length']!r}"
            )
        if run.data.seq_len % (2 * sizes["sequence"]):
            raise MeshError(
                f"data.seq_len={run.data.seq_len} does not divide into 2 x mesh.sequence={sizes['sequence']} chunks "
                "(ring attention gives each device two chunks, for balance)"
            )
    else:
        check_divisible({"length": ("data.seq_len", run.data.seq_len)}, sizes, rules)
    layout = Layout(make_mesh(run.mesh, devices), dict(rules))
    check_attention(run, layout)
    return layout


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


def check_attention(run: RunConfig, layout: Layout) -> None:
    """ConfigError (one line) when the run's attention cannot run on this layout and backend."""
    m, documents = run.model, run.data.document_mask
    imposed = attention_for(m, layout)
    if layout.sequence_shards > 1:
        if (reason := imposed.blocker(m, documents)) is not None:
            raise ConfigError(f"mesh.sequence={layout.sequence_shards}: ring attention cannot run this model: {reason}")
        return
    try:
        choose(m, documents)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if imposed is not None and (m.num_heads % head_shards(layout) or m.num_kv_heads % head_shards(layout)):
        raise ConfigError(
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


def model_for(cfg: ModelConfig, layout: Layout, rt: Runtime = TRAINING) -> Transformer:
    """The model as this layout runs it (`rt` with the layout's hooks)."""
    return Transformer(cfg, dataclasses.replace(rt, hooks=hooks_for(cfg, layout)))


def sequence_order(seq_len: int, layout: Layout) -> np.ndarray | None:
    """The zig-zag order tokens take when ring attention splits the sequence (None when it is not split)."""
    return zigzag_order(seq_len, layout.sequence_shards) if layout.sequence_shards > 1 else None


def _unboxed(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def abstract_variables(model: Transformer, layout: Layout) -> dict:
    """ShapeDtypeStructs of the model's variables ({"params", "state"}), each with the sharding its logical axis
    names get on this layout."""
    boxed = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    boxed = {"params": boxed["params"], "state": boxed.get("state", {})}
    placed = sharding.shardings(boxed, layout.mesh, layout.rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _unboxed(boxed), placed)


def abstract_params(model: Transformer, layout: Layout) -> Any:
    return abstract_variables(model, layout)["params"]


def host_copy(tree: Any) -> Any:
    """Every array whole, as NumPy, on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
