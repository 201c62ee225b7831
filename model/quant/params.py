"""A model's parameters quantized, dequantized or fake-quantized, weight by weight.

`weight_infos(cfg)` traces the model's init once and lists every weight declared through the weight seam
(model/weights.py) with its logical shape and `Layout` (which axes a matmul contracts), keyed by its parameter
path. `quantize_params(cfg, params, spec)` replaces each weight that `spec.skip` does not keep in float by its
quantized arrays (names per `model.weights.Quantized`), which the model then reads as stored: the same forward,
decode and scoring code runs a quantized tree. Scanned layer groups stack a weight on a leading axis; every
leading axis is quantized as independent matrices.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import weights
from model.config import LayerSpec, ModelConfig
from model.quant import schemes
from model.quant.schemes import QuantError, Spec
from model.transformer import Transformer, init_variables, layer_groups

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightInfo:
    path: Path  # to the float param in the params tree
    shape: tuple[int, ...]  # logical (one layer's)
    axes: tuple  # logical axis names
    layout: weights.Layout

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def matrix_layout(self, ndim: int) -> weights.Layout:
        """The layout of the stored array, whose leading `ndim - len(shape)` axes stack layers."""
        lead = ndim - len(self.shape)
        return weights.Layout(
            fan_in=tuple(a + lead for a in self.layout.fan_in),
            batch=(*range(lead), *(a + lead for a in self.layout.batch)),
        )

    def input_width(self) -> int:
        return math.prod(self.shape[a] for a in self.layout.fan_in)


@functools.cache
def weight_infos(cfg: ModelConfig) -> dict[Path, WeightInfo]:
    """Every weight of the model `cfg` describes, by parameter path."""
    with weights.recording() as declared:
        jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0)))
    infos = {}
    for scope_path, name, shape, axes, layout in declared:
        path = (*scope_path, name)
        infos[path] = WeightInfo(path, shape, axes, layout)
    return infos


def spec_of(quant) -> Spec:
    """The Spec of a `quant` or `train.qat` config (training/config.py)."""
    group = getattr(quant, "group", getattr(quant, "group_size", -1))
    return Spec(quant.scheme, None if group < 0 else group, tuple(quant.skip))


def layer_params(cfg: ModelConfig) -> list[tuple[LayerSpec, Path, tuple[int, ...]]]:
    """The trunk's layers in forward order, each as (its spec, the params path its variables are under, its index
    into their leading axes): a scanned group stacks its layers on axis 0 ("layers" or "layers_{g}", a unit's j-th
    layer under "block_{j}"), an unrolled stack names each ("layer_{i}", no leading axis)."""
    specs = cfg.layer_specs()
    if not cfg.scan_layers:
        return [(spec, (f"layer_{i}",), ()) for i, spec in enumerate(specs)]
    out = []
    for g in layer_groups(cfg):
        for r in range(g.repeats):
            for j, spec in enumerate(g.unit):
                out.append((spec, (g.name,) if len(g.unit) == 1 else (g.name, f"block_{j}"), (r,)))
    return out


def skipped(path: Path | str, skip: tuple[str, ...]) -> bool:
    """Whether a glob of `skip` matches the '/'-joined path (or a part of it)."""
    name = path if isinstance(path, str) else "/".join(path)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") for p in skip)


def _get(tree: dict, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _params_of(variables: dict) -> tuple[dict, Callable[[dict], dict]]:
    """(the params tree, a function putting a new one back where it was) of a params tree or {"params", ...}."""
    if "params" in variables and isinstance(variables["params"], dict):
        return variables["params"], lambda p: {**variables, "params": p}
    return variables, lambda p: p


def _replace(tree: dict, path: Path, entries: dict) -> dict:
    """A copy of `tree` with the leaf at `path` replaced by `entries` (name -> array) in its parent dict."""
    if len(path) == 1:
        out = {k: v for k, v in tree.items() if k != path[0]}
        return out | entries
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], entries)}


def check(cfg: ModelConfig, spec: Spec) -> None:
    """QuantError (one line, naming the weight) for a spec this model cannot take, before anything runs."""
    for info in weight_infos(cfg).values():
        if skipped(info.path, spec.skip):
            continue
        K = info.input_width()
        try:
            schemes.group_of(K, spec.group_size)
        except QuantError as e:
            raise QuantError(f"{info.name}: {e}") from None
        if schemes.BITS[spec.scheme] == 4 and K % 2:
            raise QuantError(f"{info.name}: {K} input channels cannot pack two 4-bit codes per byte")


Quantizer = Callable[[WeightInfo, jax.Array], dict]  # (weight, its matrix [..., K, N]) -> stored arrays


def rtn(spec: Spec) -> Quantizer:
    """Round to nearest: every group's scale from the weight itself."""
    return lambda info, w_KN: schemes.quantize(w_KN, spec.scheme, spec.group_size)


def quantize_params(cfg: ModelConfig, params: dict, spec: Spec, quantizer: Quantizer | None = None) -> dict:
    """`params` (or {"params", "state"}) with every weight `spec` does not skip quantized by `quantizer`
    (default: round to nearest)."""
    check(cfg, spec)
    if quantizer is None:  # one compiled program (weight by weight, eagerly, takes seconds of dispatch)
        return _quantize_rtn(cfg, spec)(params)
    return _quantize(cfg, params, spec, quantizer)


@functools.cache
def _quantize_rtn(cfg: ModelConfig, spec: Spec):
    return jax.jit(lambda params: _quantize(cfg, params, spec, rtn(spec)))


def _quantize(cfg: ModelConfig, params: dict, spec: Spec, quantizer: Quantizer) -> dict:
    fmt = weights.FORMATS[spec.scheme]
    tree, put_back = _params_of(params)
    for info in weight_infos(cfg).values():
        if skipped(info.path, spec.skip):
            continue
        w = nn.unbox(_get(tree, info.path))
        layout = info.matrix_layout(w.ndim)
        stored = quantizer(info, layout.to_matrix(w))
        names = fmt.names(info.path[-1])
        tree = _replace(tree, info.path, {names[k]: v for k, v in stored.items()})
    return put_back(tree)


def scheme_of(params: dict) -> str | None:
    """The scheme a params tree is quantized with (None: float)."""
    tree, _ = _params_of(params)
    tags = {f"_{s.replace('-', '')}": s for s in schemes.SCHEMES}
    for path, _leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = getattr(path[-1], "key", "")
        for suffix, scheme in tags.items():
            if isinstance(key, str) and key.endswith(suffix):
                return scheme
    return None


def dequantize_params(cfg: ModelConfig, params: dict, dtype=jnp.float32) -> dict:
    """The float params a quantized tree stands for (each quantized weight dequantized to `dtype`)."""
    scheme = scheme_of(params)
    if scheme is None:
        return params
    return _dequantize(cfg, scheme, jnp.dtype(dtype))(params)


@functools.cache
def _dequantize(cfg: ModelConfig, scheme: str, dtype):
    return jax.jit(lambda params: _dequantized(cfg, params, scheme, dtype))


def _dequantized(cfg: ModelConfig, params: dict, scheme: str, dtype) -> dict:
    fmt = weights.FORMATS[scheme]
    tree, put_back = _params_of(params)
    for info in weight_infos(cfg).values():
        parent = _get(tree, info.path[:-1])
        names = fmt.names(info.path[-1])
        if names["q"] not in parent:
            continue
        stored = {k: nn.unbox(parent[n]) for k, n in names.items()}
        lead = stored["q"].ndim - 2 - len(info.layout.batch)
        shape = (*stored["q"].shape[:lead], *info.shape)
        w = info.matrix_layout(len(shape)).from_matrix(schemes.dequantize(stored, scheme), shape)
        entries = {info.path[-1]: w.astype(dtype)}
        tree = _replace(tree, info.path[:-1] + (names["q"],), entries)
        for n in names.values():
            if n != names["q"]:
                parent = _get(tree, info.path[:-1])
                tree = _replace(tree, info.path[:-1] + (n,), {}) if n in parent else tree
    return put_back(tree)


def fake_quantize_params(cfg: ModelConfig, params: dict, spec: Spec, clips: dict | None = None) -> dict:
    """`params` with every weight `spec` does not skip rounded to what quantizing it stores, with a
    straight-through gradient (quantization-aware training). With `clips` (`initial_clips`' tree), each group's
    range is first multiplied by its learned factor (schemes.fake_quantize_clipped), the gradient reaching the
    factors too."""
    tree, put_back = _params_of(params)
    for info in weight_infos(cfg).values():
        if skipped(info.path, spec.skip):
            continue
        w = _get(tree, info.path)
        boxed = isinstance(w, nn.meta.AxisMetadata)
        value = nn.unbox(w)
        layout = info.matrix_layout(value.ndim)
        w_KN = layout.to_matrix(value)
        if clips is None:
            rounded_KN = schemes.fake_quantize(w_KN, spec.scheme, spec.group_size)
        else:
            rounded_KN = schemes.fake_quantize_clipped(w_KN, spec.scheme, spec.group_size, _get(clips, info.path))
        fq = layout.from_matrix(rounded_KN, value.shape)
        tree = _replace(tree, info.path, {info.path[-1]: w.replace_boxed(fq) if boxed else fq})
    return put_back(tree)


def initial_clips(cfg: ModelConfig, params: dict, spec: Spec) -> dict:
    """Learned clipping's factors at their start (1: the scheme's own scales), one per group of every weight `spec`
    quantizes, float32 [..., K/G, N] (the matrix view's scale shape), nested as the params are."""
    tree, _ = _params_of(params)
    clips: dict = {}
    for info in weight_infos(cfg).values():
        if skipped(info.path, spec.skip):
            continue
        w = nn.unbox(_get(tree, info.path))
        *lead, K, N = jax.eval_shape(info.matrix_layout(w.ndim).to_matrix, w).shape
        shape = (*lead, K // schemes.group_of(K, spec.group_size), N)
        clips = _nest(clips, info.path, jnp.ones(shape, jnp.float32))
    return clips


def clipped(spec: Spec, clips: dict) -> Quantizer:
    """Round to nearest with each group's range multiplied by its learned factor (`clips`, as `initial_clips`
    nests them): exactly what `fake_quantize_params(..., clips)` trained with."""
    return lambda info, w_KN: schemes.quantize_clipped(w_KN, spec.scheme, spec.group_size, _get(clips, info.path))


def _nest(tree: dict, path: Path, leaf) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: leaf}
    return {**tree, path[0]: _nest(tree.get(path[0], {}), path[1:], leaf)}


def stored_bytes(params: dict) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
