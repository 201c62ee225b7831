"""The train state: what one optimizer step reads and writes, its abstract shapes and where its arrays live.

`frozen` holds a model that rides along untrained (an objective's reference, e.g. the params the run started from):
no gradients reach it, the optimizer keeps nothing for it, and it is sharded as the params are.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from model import Transformer, lora
from parallel.layout import Layout, abstract_variables
from training.config import TrainConfig
from training.qat import abstract_qat


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any = flax.struct.field(default_factory=dict)  # non-trained variables, e.g. a router's bias
    frozen: Any = flax.struct.field(default_factory=dict)  # a frozen copy of params, for objectives that need one
    qat: Any = flax.struct.field(default_factory=dict)  # train.qat's learned clipping factors and their Adam state


def abstract_state(
    model: Transformer,
    tx: optax.GradientTransformation,
    layout: Layout,
    frozen: bool = False,
    train: TrainConfig | None = None,
) -> TrainState:
    """The train state's shapes, dtypes and shardings; allocates nothing. The optimizer's moments take
    their params' shardings (FSDP shards them with the params: ZeRO-3); counters and the RNG key are replicated.
    With `frozen`, the state also holds a frozen copy of the params, placed as they are; with `train` (its config),
    train.qat's learned clipping factors where it learns them, replicated (training/qat.py)."""
    variables = abstract_variables(model, layout)
    params = quantized_base(model, variables["params"], layout)
    opt_state = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    # Under train.trainable the frozen params' places in the state are optax's MaskedNode (no moments): kept as such.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_shardings = optax.tree_map_params(
        tx,
        lambda p, s: p if masked(p) else s,
        opt_state,
        param_shardings,
        transform_non_params=lambda _: layout.replicated,
        is_leaf=masked,
    )
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    rep, key = layout.replicated, jax.eval_shape(lambda: jax.random.key(0))
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=params,
        opt_state=jax.tree.map(place, opt_state, opt_shardings),
        rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
        model_state=variables["state"],
        frozen=params if frozen else {},
        qat={} if train is None else abstract_qat(model.cfg, train, params, rep),
    )


def quantized_base(model: Transformer, params: Any, layout: Layout) -> Any:
    """The abstract params as a QLoRA run holds them (`model.lora.base_quant`: the base in NF4, model.lora); the
    codes and scales are replicated, the float leaves keep their shardings."""
    if not model.cfg.lora.base_quant:
        return params
    shardings = {path: x.sharding for path, x in jax.tree_util.tree_leaves_with_path(params)}
    stored = jax.eval_shape(lambda p: lora.quantize_base(model.cfg, p), params)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings.get(path, layout.replicated)),
        stored,
    )


def shardings_of(abstract: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, abstract)
