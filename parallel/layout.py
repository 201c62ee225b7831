"""Where a run's arrays live: its mesh and rules (`Layout`), the model as the mesh runs it (with the hooks
parallel/hooks.py builds), and the shardings of its variables.

Everything here is decided from the config and the device count, before anything compiles, so a mesh
that does not fit the run fails with a one-line error and nothing on disk touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import ModelConfig, Transformer, init_variables
from model.runtime import TRAINING, Runtime
from parallel import hooks, sharding
from parallel.mesh import MeshError, check_divisible, make_mesh, mesh_axes, resolve_sizes
from parallel.ring import zigzag_order


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


def plan(run, devices: list | None = None) -> Layout:
    """The mesh of `run` (a training.config.RunConfig) over `devices` (default: all global devices); MeshError when
    it does not fit the devices, the run's shapes, or its attention."""
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
            # What the chosen kinds split over the mesh, e.g. MoE's experts (training.config checks a given
            # mesh.expert; this, the one that mesh.expert=-1 takes).
            **{k: v for kind in m.kinds() for k, v in getattr(kind, "mesh_dims", lambda cfg: {})(m).items()},
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
    hooks.check_attention(m, run.data.document_mask, layout)
    return layout


def model_for(cfg: ModelConfig, layout: Layout, rt: Runtime = TRAINING) -> Transformer:
    """The model as this layout runs it (`rt` with the layout's hooks: parallel/hooks.py)."""
    return Transformer(cfg, dataclasses.replace(rt, hooks=hooks.hooks_for(cfg, layout)))


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
