"""The weight seam: every matmul weight of the network (dense projections, MoE experts and router, MLA's
up-projections in both decode paths, the token embedding and tied or untied output head, the MTP heads' projections)
is declared and read through `weight`, so how a weight is stored is one entry of `FORMATS`.

A format `create(module, name, init, shape, axes, param_dtype)` declares the variables that hold weight `name` of
logical `shape` in `module` (float: the param itself; int8: codes and scales; LoRA: a base plus two low-rank
factors) and returns them as a dict; `read(stored, name, dtype)` gives the float weight [shape] a matmul multiplies
by, in the compute dtype. `read` is also what code that holds a module's variables calls (MLA's absorbed decoding
reads its key/value up-projection outside the projection's own call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp


class WeightFormat(Protocol):
    def create(self, module: nn.Module, name: str, init: Callable, shape: tuple, axes: tuple, param_dtype) -> dict: ...

    def read(self, stored: dict, name: str, dtype) -> jax.Array: ...


class Float:
    """The weight as one param of its logical shape (what training updates)."""

    def create(self, module, name, init, shape, axes, param_dtype) -> dict:
        return {name: module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)}

    def read(self, stored, name, dtype) -> jax.Array:
        return nn.unbox(stored[name]).astype(dtype)


FORMATS: dict[str, WeightFormat] = {"float": Float()}


def weight(module: nn.Module, fmt: str, name: str, init: Callable, shape, axes, cfg, dtype=None) -> jax.Array:
    """Declares weight `name` of `module` in format `fmt` and returns it as a float array of `dtype` (default: the
    compute dtype; a router multiplies in float32). Call from a compact method or setup."""
    f = FORMATS[fmt]
    stored = f.create(module, name, init, tuple(shape), tuple(axes), jnp.dtype(cfg.param_dtype))
    return f.read(stored, name, jnp.dtype(cfg.dtype if dtype is None else dtype))


def read(fmt: str, variables: dict, name: str, cfg) -> jax.Array:
    """Weight `name` from a module's variables (`module.variables["params"][...]`) in format `fmt`."""
    return FORMATS[fmt].read(variables, name, jnp.dtype(cfg.dtype))
