"""The logical-to-mesh rules table applied: shardings for parameters, optimizer state and batches.

model/ annotates every parameter (`nn.with_logical_partitioning`) and key activation
(`nn.with_logical_constraint`) with logical axis names; this module is the only place that turns
those names into mesh axes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.mesh import mesh_axes

LogicalRules = tuple[tuple[str, tuple[str, ...] | None], ...]


def logical_rules(rules: dict[str, str]) -> LogicalRules:
    """The config's {logical name: "axis,axis"} table as Flax's ordered (name, mesh axes) pairs."""
    return tuple((name, mesh_axes(rule) or None) for name, rule in rules.items())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: dict[str, str]):
    """Within this block, jitted model code places its annotated activations on `mesh` by `rules`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(rules)):
        yield


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: dict[str, str]) -> PartitionSpec:
    """The PartitionSpec the rules give an array with these logical axis names, leaving whole any dimension
    its mesh axes do not divide (e.g. a 257-token vocabulary over 4 tensor shards)."""
    spec = nn.logical_to_mesh_axes(names, logical_rules(rules))
    fitted = []
    for dim, axes in zip(shape, spec):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fitted.append(axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return PartitionSpec(*fitted)


def shardings(abstract_boxed: Any, mesh: Mesh, rules: dict[str, str]) -> Any:
    """NamedShardings for a pytree whose leaves may be boxed in `nn.LogicallyPartitioned` (params and the
    optimizer state that mirrors them); unannotated leaves (step counters, RNG keys) are replicated."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, rules: dict[str, str]) -> NamedSharding:
    """Batches ({'tokens': [B, T+1]} and the like) split along the batch dimension only."""
    return NamedSharding(mesh, PartitionSpec(mesh_axes(rules["batch"]) or None))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """One global array per key from this process's rows (all rows on a single process)."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}


def replicated_batch(full: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """One global array per key from a batch every process holds whole (validation batches)."""
    return {
        key: jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
        for key, value in full.items()
    }


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """(first row, row count) of the global batch this process's devices hold: the rows it must load."""
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted({idx[0].indices(global_rows)[0] for idx in index_map.values()})
    stops = sorted({idx[0].indices(global_rows)[1] for idx in index_map.values()})
    return starts[0], stops[-1] - starts[0]
