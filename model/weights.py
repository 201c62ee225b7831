"""The weight seam: every matmul weight of the network (dense projections, MoE experts and router, MLA's
up-projections in both decode paths, the token embedding and tied or untied output head, the MTP heads' projections)
is declared and read through `weight`, so how a weight is stored is one entry of `FORMATS`.

A format `create(module, name, init, shape, axes, param_dtype, layout)` declares the variables that hold weight
`name` of logical `shape` in `module` (float: the param itself; int8: codes and scales; LoRA: a base plus two
low-rank factors) and returns them as a dict; `read(stored, name, dtype, shape, layout)` gives the float weight
[shape] a matmul multiplies by, in the compute dtype. `read` is also what code that holds a module's variables calls
(MLA's absorbed decoding reads its key/value up-projection outside the projection's own call). A weight's `Layout`
says which of its axes a matmul contracts (what quantization groups) and which index independent matrices.

Quantized weights (model/quant: `python -m model.quant`, `infer.py --quant`) name their scheme in their variables
("kernel_int4", "kernel_scale", ...), so they are read as stored whatever format the caller asks for: a quantized
checkpoint runs through training's evaluation, scoring and decoding alike. `fmt` decides how a weight that no
format claims is created and read (float, or a test's perturbed format).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.quant import schemes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a weight's logical shape a matmul contracts (`fan_in`) and which index independent matrices
    (`batch`: MoE experts); the rest are its outputs. The default: the first axis in, the rest out."""

    fan_in: tuple[int, ...] = (0,)
    batch: tuple[int, ...] = ()

    def out(self, ndim: int) -> tuple[int, ...]:
        return tuple(a for a in range(ndim) if a not in self.fan_in and a not in self.batch)

    def to_matrix(self, w: jax.Array) -> jax.Array:
        """[*shape] -> [*batch, K, N] (K: the fan-in axes flattened, N: the outputs)."""
        out = self.out(w.ndim)
        perm = (*self.batch, *self.fan_in, *out)
        lead = [w.shape[a] for a in self.batch]
        K, N = math.prod(w.shape[a] for a in self.fan_in), math.prod(w.shape[a] for a in out)
        return w.transpose(perm).reshape(*lead, K, N)

    def from_matrix(self, m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The inverse of `to_matrix` for a weight of logical `shape`."""
        out = self.out(len(shape))
        perm = (*self.batch, *self.fan_in, *out)
        return m.reshape([shape[a] for a in perm]).transpose([perm.index(a) for a in range(len(shape))])


class WeightFormat(Protocol):
    def create(
        self, module: nn.Module, name: str, init: Callable, shape: tuple, axes: tuple, param_dtype, layout: Layout
    ) -> dict: ...

    def read(self, stored: dict, name: str, dtype, shape: tuple, layout: Layout) -> jax.Array: ...


class Float:
    """The weight as one param of its logical shape (what training updates)."""

    def create(self, module, name, init, shape, axes, param_dtype, layout) -> dict:
        return {name: module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)}

    def read(self, stored, name, dtype, shape, layout) -> jax.Array:
        return nn.unbox(stored[name]).astype(dtype)


class Quantized:
    """A weight quantized with `scheme` (model/quant/schemes.py) as its matrix [*batch, K, N] (`Layout`): codes
    "{name}_{tag}" (4-bit schemes packed two per byte along K), "{name}_scale" per group of K, and by scheme
    "{name}_zero" or nf4's "{name}_scale2" and "{name}_offset". Read by dequantizing. It never creates codes:
    asked to create a weight its variables do not hold (initialising a model), it declares the float param,
    which `model.quant.quantize_params` turns into these."""

    def __init__(self, scheme: str):
        self.scheme, self.tag = scheme, scheme.replace("-", "")

    def names(self, name: str) -> dict[str, str]:
        extra = ("scale2", "offset") if self.scheme == "nf4" else ("zero",) if "-zp" in self.scheme else ()
        return {"q": f"{name}_{self.tag}", "scale": f"{name}_scale", **{k: f"{name}_{k}" for k in extra}}

    def holds(self, variables, name: str) -> bool:
        return f"{name}_{self.tag}" in variables

    def create(self, module, name, init, shape, axes, param_dtype, layout) -> dict:
        if not module.has_variable("params", f"{name}_{self.tag}"):
            return FORMATS["float"].create(module, name, init, shape, axes, param_dtype, layout)
        return {n: module.get_variable("params", n) for n in self.names(name).values()}

    def read(self, stored, name, dtype, shape, layout) -> jax.Array:
        if name in stored:  # created as float (see create)
            return FORMATS["float"].read(stored, name, dtype, shape, layout)
        arrays = {k: nn.unbox(stored[n]) for k, n in self.names(name).items()}
        return layout.from_matrix(schemes.dequantize(arrays, self.scheme), shape).astype(dtype)


FORMATS: dict[str, WeightFormat] = {"float": Float(), **{s: Quantized(s) for s in schemes.SCHEMES}}

_recording: list | None = None


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collects (module path, name, logical shape, axes, Layout) of every weight declared inside (trace a model's
    init under it: model/quant maps each parameter to its matrix this way)."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def stored_format(variables, name: str, fmt: str) -> WeightFormat:
    """The format whose variables hold weight `name` (a quantized scheme names itself), else `fmt`'s."""
    for f in FORMATS.values():
        if isinstance(f, Quantized) and f.holds(variables, name):
            return f
    return FORMATS[fmt]


def weight(
    module: nn.Module, fmt: str, name: str, init: Callable, shape, axes, cfg, dtype=None, layout: Layout = Layout()
) -> jax.Array:
    """Declares weight `name` of `module` in format `fmt` (or the quantized format its variables are stored in)
    and returns it as a float array of `dtype` (default: the compute dtype; a router multiplies in float32). Call
    from a compact method or setup."""
    shape, axes = tuple(shape), tuple(axes)
    if _recording is not None:
        _recording.append((tuple(module.scope.path), name, shape, axes, layout))
    f = stored_format(module.variables.get("params", {}), name, fmt)
    stored = f.create(module, name, init, shape, axes, jnp.dtype(cfg.param_dtype), layout)
    return f.read(stored, name, jnp.dtype(cfg.dtype if dtype is None else dtype), shape, layout)


def read(fmt: str, variables: dict, name: str, cfg, shape, layout: Layout = Layout()) -> jax.Array:
    """Weight `name` of logical `shape` from a module's variables (`module.variables["params"][...]`) in format
    `fmt` (or the quantized format they are stored in)."""
    return stored_format(variables, name, fmt).read(variables, name, jnp.dtype(cfg.dtype), tuple(shape), layout)
