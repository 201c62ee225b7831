"""Devices -> a named `jax.sharding.Mesh`, checked against the run's shapes before anything compiles."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from parallel.config import MESH_AXES, MeshConfig


class MeshError(ValueError):
    """A mesh that does not fit the devices or the run's shapes (a one-line message)."""


def resolve_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis filled in; raises MeshError unless their product is `num_devices`."""
    sizes = cfg.sizes()
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{axis}={size}: must be a positive device count or -1 (the remaining devices)")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError(
            f"mesh.{fill[0]} and mesh.{fill[1]} are both -1: at most one axis can take the remaining devices"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(
                f"mesh.{fill[0]}=-1: the other axes span {fixed} devices, which does not divide the {num_devices} devices"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "all axes 1"
        raise MeshError(f"mesh {shape} spans {fixed} devices but there are {num_devices}")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (global) devices with every axis of MESH_AXES, Auto-typed so GSPMD propagates the
    shardings the rules put on parameters and activations."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(cfg, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_shards(sizes: dict[str, int], rules: dict[str, str]) -> int:
    """How many pieces the batch dimension is split into."""
    return math.prod(sizes[axis] for axis in mesh_axes(rules["batch"]))


def mesh_axes(rule: str) -> tuple[str, ...]:
    return tuple(axis for axis in rule.split(",") if axis)


def check_divisible(dims: dict[str, tuple[str, int]], sizes: dict[str, int], rules: dict[str, str]) -> None:
    """Raises MeshError unless each dimension divides evenly over the mesh axes its logical name maps to.

    `dims` maps a logical name to (the config key that sets the dimension, its size),
    e.g. {"kv_heads": ("model.num_kv_heads", 2)}.
    """
    for name, (key, dim) in dims.items():
        axes = mesh_axes(rules.get(name, ""))
        span = math.prod(sizes[axis] for axis in axes)
        if dim % span:
            over = " x ".join(f"mesh.{axis}={sizes[axis]}" for axis in axes if sizes[axis] > 1)
            raise MeshError(f"{key}={dim} does not divide over {over} ({span} shards of '{name}')")
