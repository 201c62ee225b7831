"""Where a run's arrays live: its mesh, the model variant the mesh needs, and the train state's shardings.

Everything here is decided from the config and the device count, before anything compiles, so a mesh
that does not fit the run fails with a one-line error and nothing on disk touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import ModelConfig, Transformer, init_variables
from model import moe as moe_lib
from model.attention import Implementation, choose
from parallel import sharding
from parallel.expert import expert_parallel
from parallel.mesh import MeshError, check_divisible, make_mesh, mesh_axes, resolve_sizes
from parallel.ring import ring_attention, zigzag_order
from training.config import ConfigError, RunConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any = flax.struct.field(default_factory=dict)  # non-trained variables, e.g. a router's bias


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
        """The context in which the model's logical annotations place activations on this mesh, and MoE layers
        move assignments to their experts' devices by all-to-all when the mesh splits experts (parallel/expert.py)."""
        experts = None
        if self.mesh.shape["expert"] > 1:
            experts = expert_parallel(self.mesh, mesh_axes(self.rules["batch"]))
        with sharding.activate(self.mesh, self.rules), moe_lib.expert_collectives(experts):
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


def attention_for(layout: Layout) -> Implementation | None:
    """The attention implementation the layout imposes (None: the one the model config chooses)."""
    return ring_implementation(layout) if layout.sequence_shards > 1 else None


def check_attention(run: RunConfig, layout: Layout) -> None:
    """ConfigError (one line) when the run's attention cannot run on this layout and backend."""
    documents = run.data.document_mask
    imposed = attention_for(layout)
    if imposed is not None:
        if (reason := imposed.blocker(run.model, documents)) is not None:
            raise ConfigError(f"mesh.sequence={layout.sequence_shards}: ring attention cannot run this model: {reason}")
        return
    try:
        choose(run.model, documents)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_for(cfg: ModelConfig, layout: Layout) -> Transformer:
    """The model as this layout runs it: with ring attention when the sequence is split over devices."""
    return Transformer(cfg, attention=attention_for(layout))


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


def abstract_state(model: Transformer, tx: optax.GradientTransformation, layout: Layout) -> TrainState:
    """The train state's shapes, dtypes and shardings; allocates nothing. The optimizer's moments take
    their params' shardings (FSDP shards them with the params: ZeRO-3); counters and the RNG key are replicated."""
    variables = abstract_variables(model, layout)
    params = variables["params"]
    opt_state = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_state, param_shardings, transform_non_params=lambda _: layout.replicated
    )
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    rep, key = layout.replicated, jax.eval_shape(lambda: jax.random.key(0))
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=params,
        opt_state=jax.tree.map(place, opt_state, opt_shardings),
        rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
        model_state=variables["state"],
    )


def shardings_of(abstract: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, abstract)


def host_copy(tree: Any) -> Any:
    """Every array whole, as NumPy, on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
