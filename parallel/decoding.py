"""Decoding on a mesh (infer.py --mesh data=D,tensor=T): the mesh, the weights placed on it by the logical rules,
and the context in which the decode programs trace.

Rows of the batch split over `data` (and `fsdp`), attention heads and the MLP's hidden units over `tensor`
(Megatron: each device holds its heads' query/key/value columns and the matching rows of the output projection,
and its heads' part of the decode cache), as training lays out the same params. The decode programs are the
one-device ones (sampling/decode.py): the model's logical annotations place activations and caches, and GSPMD
adds the collectives, so tokens equal the one-device ones (tests/multidevice/test_sharded_decode.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax

from model import ModelConfig, Transformer
from parallel.config import DEFAULT_RULES, MeshConfig
from parallel.layout import Layout, abstract_variables
from parallel.mesh import MeshError, check_divisible, make_mesh, mesh_axes, resolve_sizes

DECODE_AXES = ("data", "fsdp", "tensor")  # sequence (ring attention) and expert (all-to-all) axes train only


def parse_mesh(spec: str) -> MeshConfig:
    """'data=2,tensor=4' -> MeshConfig (axes not named span 1 device); MeshError (one line) on anything else."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        axis, sep, value = item.partition("=")
        if not sep or axis not in DECODE_AXES or not value.lstrip("-").isdigit():
            raise MeshError(f"--mesh={spec!r}: expected axis=devices,... with axes among {', '.join(DECODE_AXES)}")
        if axis in sizes:
            raise MeshError(f"--mesh={spec!r}: {axis} appears twice")
        sizes[axis] = int(value)
    if not sizes:
        raise MeshError(f"--mesh={spec!r}: name at least one axis, e.g. data=2,tensor=4")
    return MeshConfig(**{"data": 1, **sizes})


def decode_layout(cfg: ModelConfig, spec: str, devices: list | None = None) -> Layout:
    """The mesh `spec` describes over `devices` (default: all), with the rules that place the model on it; MeshError
    when it does not fit the devices or the model's heads."""
    mesh_cfg = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    rules = dict(DEFAULT_RULES)
    heads = {"heads": ("model.num_heads", cfg.num_heads), "kv_heads": ("model.num_kv_heads", cfg.num_kv_heads)}
    try:
        check_divisible(heads, resolve_sizes(mesh_cfg, len(devices)), rules)
    except MeshError as e:
        raise MeshError(f"--mesh={spec!r}: {e}") from None
    return Layout(make_mesh(mesh_cfg, devices), rules)


def row_shards(layout: Layout) -> int:
    """How many pieces a batch of rows is split into (decoding pads its rows to a multiple of this)."""
    return math.prod(layout.mesh.shape[axis] for axis in mesh_axes(layout.rules["batch"]))


def place_weights(weights: Any, cfg: ModelConfig, layout: Layout) -> Any:
    """`weights` (params, or {"params", "state"}) on the layout's mesh, each leaf sharded as training places it."""
    placed = jax.tree.map(lambda x: x.sharding, abstract_variables(Transformer(cfg), layout))
    if isinstance(weights, dict) and "params" in weights:
        return {name: _put(tree, placed[name]) for name, tree in weights.items()}
    return _put(weights, placed["params"])


def _put(tree: Any, placed: Any) -> Any:
    """`tree` placed as `placed` (the float tree's shardings) says; leaves it does not name (a quantized weight's
    codes and scales, model/quant) are replicated over the mesh."""
    shardings = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(placed)}
    replicated = jax.sharding.NamedSharding(next(iter(shardings.values())).mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, shardings.get(jax.tree_util.keystr(p), replicated)), tree
    )
