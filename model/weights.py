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

LoRA wraps whichever format holds a weight (`LoRA(base, ...)`, not a FORMATS entry: it has a rank and a scale) for
every weight the model config's `lora.targets` names (`LORA_TARGETS`), so QLoRA is LoRA over the nf4 format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.kernels import cpu_quant_matmul
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

    def fuses(self, stored, name, layout) -> bool:
        """Whether `matmul` and `take` compute from the codes (not for weights held in float, nor for stacks of
        independent matrices: MoE experts)."""
        return name not in stored and not layout.batch

    def matmul(self, stored, name, x_MK, shape, layout) -> jax.Array | None:
        """x_MK @ the weight's matrix [K, N] computed from its codes (`codes_matmul`), or None where it does not
        fuse."""
        if not self.fuses(stored, name, layout):
            return None
        arrays = {k: nn.unbox(stored[n]) for k, n in self.names(name).items()}
        return codes_matmul(x_MK, arrays, self.scheme)

    def take(self, stored, name, ids, dtype, shape, layout) -> jax.Array | None:
        """Rows `ids` of a [rows, columns] weight whose columns are its input channels (an embedding table), only
        those dequantized; None where it is held in float."""
        if not self.fuses(stored, name, layout) or layout != Layout((1,)):
            return None
        arrays = {k: nn.unbox(stored[n]) for k, n in self.names(name).items()}
        columns = {k: jnp.take(v, ids.reshape(-1), axis=-1) if v.ndim == 2 else v for k, v in arrays.items()}
        if "scale2" in arrays:  # nf4's double-quantized scales are blocks of the whole table: dequantize them first
            columns["scale"] = jnp.take(schemes.scales_of(arrays, self.scheme), ids.reshape(-1), axis=-1)
            codes = jnp.take(schemes.codes_of(arrays, self.scheme), ids.reshape(-1), axis=-1)
            rows_KN = schemes.values_of(codes, self.scheme, columns["scale"])
        else:
            rows_KN = schemes.dequantize(columns, self.scheme)
        return rows_KN.T.reshape(*ids.shape, shape[1]).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def codes_matmul(x_MK: jax.Array, stored: dict, scheme: str) -> jax.Array:
    """float32 x_MK @ W_KN of a quantized [K, N] matrix without its float weight: the C++ CPU kernel
    (model/kernels/cpu_quant_matmul) for the few rows of decoding where it runs, else `tiled_matmul`.

    The codes are frozen (QLoRA's base): the gradient reaches x only, dy @ W^T computed tile by tile
    (`tiled_matmul_t`) from the codes, which are all the backward pass keeps. Autodiff through the tiled loop would
    keep every float tile, and a remat policy that saves matmul outputs every tile's partial product."""
    if cpu_quant_matmul.blocker(x_MK.shape[0], stored, scheme) is None:
        return cpu_quant_matmul.quant_matmul(x_MK, stored, scheme)
    return tiled_matmul(x_MK, stored, scheme)


def _codes_matmul_fwd(x_MK, stored, scheme):
    return codes_matmul(x_MK, stored, scheme), (stored, jnp.zeros((0,), x_MK.dtype))  # (x's dtype)


def _codes_matmul_bwd(scheme, residuals, dy_MN):
    stored, like = residuals
    frozen = jax.tree.map(
        lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else np.zeros(a.shape, jax.dtypes.float0),
        stored,
    )
    return tiled_matmul_t(dy_MN, stored, scheme).astype(like.dtype), frozen


codes_matmul.defvjp(_codes_matmul_fwd, _codes_matmul_bwd)


TILE = 256  # input channels dequantized at once by tiled_matmul (at most; a divisor of K that groups fit)


def _tiles(stored: dict, scheme: str) -> tuple[int, int, Callable[[jax.Array], jax.Array]]:
    """(tile, tiles, tile i's float weight [tile, N]) of a quantized [K, N] matrix cut into tiles of at most `TILE`
    input channels that its groups fit."""
    codes_KN = schemes.codes_of(stored, scheme)
    scale_GN = schemes.scales_of(stored, scheme)
    zero_GN = stored.get("zero")
    K = codes_KN.shape[0]
    G = K // scale_GN.shape[0]
    tile = next((t for t in (TILE, 128, 64, 32) if K % t == 0 and (t % G == 0 or G % t == 0)), K)
    per = max(tile // G, 1)  # scale rows a tile spans

    def weight(i):
        q = jax.lax.dynamic_slice_in_dim(codes_KN, i * tile, tile, 0)
        row = (i * tile) // G
        s = jax.lax.dynamic_slice_in_dim(scale_GN, row, per, 0)
        z = None if zero_GN is None else jax.lax.dynamic_slice_in_dim(zero_GN, row, per, 0)
        return schemes.values_of(q, scheme, s, z)

    return tile, K // tile, weight


def tiled_matmul(x_MK: jax.Array, stored: dict, scheme: str) -> jax.Array:
    """x_MK @ W_KN of a quantized [K, N] matrix, dequantizing `TILE` input channels at a time inside a loop, so
    the float weight never exists whole: decoding reads the int8/int4 codes (a quarter / an eighth of float32's
    bytes) and each float tile stays in cache. float32 accumulation; the result equals x_MK @ dequantize(W)
    within float rounding (the sum is split by tiles)."""
    tile, steps, weight = _tiles(stored, scheme)
    N = schemes.codes_of(stored, scheme).shape[1]

    def body(acc_MN, i):
        x = jax.lax.dynamic_slice_in_dim(x_MK, i * tile, tile, 1).astype(jnp.float32)
        return acc_MN + x @ weight(i), None

    if steps == 1:
        return body(jnp.zeros((x_MK.shape[0], N), jnp.float32), 0)[0]
    return jax.lax.scan(body, jnp.zeros((x_MK.shape[0], N), jnp.float32), jnp.arange(steps))[0]


def tiled_matmul_t(dy_MN: jax.Array, stored: dict, scheme: str) -> jax.Array:
    """dy_MN @ W_KN^T [M, K] of a quantized matrix, a tile of input channels at a time (`tiled_matmul`'s
    transpose: the backward pass of `codes_matmul`)."""
    tile, steps, weight = _tiles(stored, scheme)
    dy_MN = dy_MN.astype(jnp.float32)
    _, parts_SMT = jax.lax.scan(lambda _, i: (None, dy_MN @ weight(i).T), None, jnp.arange(steps))
    return parts_SMT.transpose(1, 0, 2).reshape(dy_MN.shape[0], steps * tile)


FORMATS: dict[str, WeightFormat] = {"float": Float(), **{s: Quantized(s) for s in schemes.SCHEMES}}

# `model.lora.targets` names -> the weights each adapts, by their logical name (`logical_name`): a projection's
# module name, or an MoE layer's expert weights' own name ("gate" adapts SwiGLU's gate and the experts' alike).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("query",),
    "k": ("key",),
    "v": ("value",),
    "o": ("out",),
    "gate": ("gate",),
    "up": ("up",),
    "down": ("down",),
    "q_down": ("q_down",),  # MLA's low-rank projections
    "q_up": ("q_up",),
    "kv_down": ("kv_down",),
    "kv_up": ("kv_up",),
}
LORA_SUFFIXES = ("_lora_a", "_lora_b")


def logical_name(module: nn.Module, name: str) -> str:
    """What `model.lora.targets` calls weight `name` of `module`: a Dense layer's "kernel" by its module's name."""
    return module.name if name == "kernel" else name


def lora_delta(a: jax.Array, b: jax.Array, layout: Layout, shape: tuple) -> jax.Array:
    """A B as a weight of logical `shape`: a [*batch, *fan_in, r] and b [*batch, r, *out] (their axes in
    `layout`'s order) multiplied as matrices [*batch, K, r] @ [*batch, r, N]."""
    lead = a.shape[: len(layout.batch)]
    a_LKR = a.reshape(*lead, -1, a.shape[-1]).astype(jnp.float32)
    b_LRN = b.reshape(*lead, b.shape[len(lead)], -1).astype(jnp.float32)
    return layout.from_matrix(a_LKR @ b_LRN, shape)


class LoRA:
    """A frozen base weight in format `base` (float, or a quantized scheme: QLoRA) plus low-rank factors
    "{name}_lora_a" [*batch, *fan_in, r] and "{name}_lora_b" [*batch, r, *out] (axes in `Layout` order, so they keep
    the weight's logical axis names): W + scale A B. A starts as peft's (uniform, bound 1 / sqrt(fan_in)), B at zero,
    so the model starts as its base. A matmul adds scale * (dropout(x) A) B to x W, never forming A B; `read` (MoE
    experts, MLA's absorbed decoding) gives the merged weight, undropped."""

    def __init__(self, base: WeightFormat, rank: int, scale: float, dropout: float):
        self.base, self.rank, self.scale, self.dropout = base, rank, scale, dropout

    def create(self, module, name, init, shape, axes, param_dtype, layout) -> dict:
        stored = self.base.create(module, name, init, shape, axes, param_dtype, layout)
        out, r = layout.out(len(shape)), self.rank
        pick = lambda idx: ([shape[a] for a in idx], [axes[a] for a in idx])  # noqa: E731
        (batch, batch_axes), (fan, fan_axes), (outs, out_axes) = pick(layout.batch), pick(layout.fan_in), pick(out)
        bound = 1 / math.prod(fan) ** 0.5
        a_init = lambda key, s, d: jax.random.uniform(key, s, d, -bound, bound)  # noqa: E731
        a = module.param(
            f"{name}_lora_a", nn.with_logical_partitioning(a_init, (*batch_axes, *fan_axes, None)), (*batch, *fan, r),
            param_dtype,
        )  # fmt: skip
        b = module.param(
            f"{name}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (*batch_axes, None, *out_axes)),
            (*batch, r, *outs), param_dtype,
        )  # fmt: skip
        stored = {**stored, "lora_a": a, "lora_b": b}
        if self.dropout and module.has_rng("noise"):  # training: the train step passes its noise key
            stored["lora_dropout"] = module.make_rng("noise")
        return stored

    def read(self, stored, name, dtype, shape, layout) -> jax.Array:
        w = self.base.read(stored, name, jnp.float32, shape, layout)
        a, b = nn.unbox(stored["lora_a"]), nn.unbox(stored["lora_b"])
        return (w + self.scale * lora_delta(a, b, layout, shape)).astype(dtype)

    def matmul(self, stored, name, x_MK, shape, layout) -> jax.Array | None:
        """x_MK @ W + scale * (dropout(x_MK) @ A) @ B (a 2-D weight: Dense's; None for stacks of experts)."""
        if layout.batch:
            return None
        fused = getattr(self.base, "matmul", None)
        y_MN = fused(stored, name, x_MK, shape, layout) if fused else None
        if y_MN is None:
            w_KN = self.base.read(stored, name, x_MK.dtype, shape, layout)
            y_MN = x_MK @ layout.to_matrix(w_KN)
        a_KR = nn.unbox(stored["lora_a"]).reshape(x_MK.shape[1], -1).astype(x_MK.dtype)
        b_RN = nn.unbox(stored["lora_b"]).reshape(a_KR.shape[1], -1).astype(x_MK.dtype)
        if "lora_dropout" in stored:
            keep = jax.random.bernoulli(stored["lora_dropout"], 1 - self.dropout, x_MK.shape)
            x_MK = jnp.where(keep, x_MK / (1 - self.dropout), 0).astype(x_MK.dtype)
        return y_MN + self.scale * _low_rank(x_MK, a_KR, b_RN).astype(y_MN.dtype)


@jax.custom_vjp
def _low_rank(x_MK: jax.Array, a_KR: jax.Array, b_RN: jax.Array) -> jax.Array:
    """(x A) B whose backward pass keeps x, A, B and x A [M, r] only. As plain matmuls, a remat policy that saves
    matmul outputs (model.remat 'dots') would also keep the [M, N] product: one more output-sized activation per
    adapted projection than the model without adapters."""
    return (x_MK @ a_KR) @ b_RN


def _low_rank_fwd(x_MK, a_KR, b_RN):
    xa_MR = x_MK @ a_KR
    return xa_MR @ b_RN, (x_MK, a_KR, b_RN, xa_MR)


def _low_rank_bwd(residuals, dy_MN):
    x_MK, a_KR, b_RN, xa_MR = residuals
    dxa_MR = dy_MN @ b_RN.T
    return dxa_MR @ a_KR.T, x_MK.T @ dxa_MR, xa_MR.T @ dy_MN


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


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


@dataclasses.dataclass(frozen=True)
class Declared:
    """A weight as declared: its format, the variables holding it, its logical shape and layout, and the dtype it
    is read in. `value()` is the float weight; `matmul(x_MK)` and `take(ids)` are what a format can compute
    without the whole float weight (quantized: tile by tile, or only the rows looked up), else None."""

    fmt: WeightFormat
    stored: dict
    name: str
    shape: tuple
    layout: Layout
    dtype: jnp.dtype

    def value(self) -> jax.Array:
        return self.fmt.read(self.stored, self.name, self.dtype, self.shape, self.layout)

    @property
    def fused(self) -> bool:
        """Whether `matmul` and `take` work from the stored form (else they give None: use `value()`)."""
        fuses = getattr(self.fmt, "fuses", None)
        return bool(fuses and fuses(self.stored, self.name, self.layout))

    def matmul(self, x_MK: jax.Array) -> jax.Array | None:
        fused = getattr(self.fmt, "matmul", None)
        y = fused(self.stored, self.name, x_MK, self.shape, self.layout) if fused else None
        return None if y is None else y.astype(self.dtype)

    def take(self, ids: jax.Array) -> jax.Array | None:
        fused = getattr(self.fmt, "take", None)
        return fused(self.stored, self.name, ids, self.dtype, self.shape, self.layout) if fused else None


def declare(
    module: nn.Module, fmt: str, name: str, init: Callable, shape, axes, cfg, dtype=None, layout: Layout = Layout()
) -> Declared:
    """Declares weight `name` of `module` in format `fmt` (or the quantized format its variables are stored in),
    to be read in `dtype` (default: the compute dtype; a router multiplies in float32). Call from a compact method
    or setup."""
    shape, axes = tuple(shape), tuple(axes)
    if _recording is not None:
        _recording.append((tuple(module.scope.path), name, shape, axes, layout))
    f = stored_format(module.variables.get("params", {}), name, fmt)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.rank and any(logical_name(module, name) in LORA_TARGETS[t] for t in lora.targets):
        f = LoRA(f, lora.rank, lora.scale, lora.dropout)
    stored = f.create(module, name, init, shape, axes, jnp.dtype(cfg.param_dtype), layout)
    return Declared(f, stored, name, shape, layout, jnp.dtype(cfg.dtype if dtype is None else dtype))


def weight(
    module: nn.Module, fmt: str, name: str, init: Callable, shape, axes, cfg, dtype=None, layout: Layout = Layout()
) -> jax.Array:
    """`declare`, then the float weight."""
    return declare(module, fmt, name, init, shape, axes, cfg, dtype, layout).value()


def read(fmt: str, variables: dict, name: str, cfg, shape, layout: Layout = Layout()) -> jax.Array:
    """Weight `name` of logical `shape` from a module's variables (`module.variables["params"][...]`) in format
    `fmt` (or the quantized format they are stored in), with its LoRA adapters where it has some."""
    f = stored_format(variables, name, fmt)
    if f"{name}_lora_a" in variables:
        f = LoRA(f, cfg.lora.rank, cfg.lora.scale, 0.0)
        variables = {**variables, "lora_a": variables[f"{name}_lora_a"], "lora_b": variables[f"{name}_lora_b"]}
    return f.read(variables, name, jnp.dtype(cfg.dtype), tuple(shape), layout)
