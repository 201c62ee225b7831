"""The decoder-only transformer: embed -> layer groups -> final norm -> float32 logits (+ aux terms, hidden states).

Each layer is an attention kind plus an MLP kind from model/kinds.py, as `cfg.layer_specs()` says. The layers
are grouped (`layer_groups`) into scanned runs of a repeating unit: a uniform stack is one group of one layer
(the parameter tree of every earlier version: "layers", stacked on axis 0), a stack with a global layer every n
is one group whose unit is n layers, k dense layers before MoE ones are two groups. Each group compiles its unit
once, however many times it repeats.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model import heads as heads_lib
from model.aux import Aux, mean_over_layers
from model.block import Block
from model.config import LayerSpec, ModelConfig
from model.kernels import cpu_attention, flash_attention
from model.layers import CALIBRATION, output_head, token_embedding
from model.mask import Mask
from model.positions import POSITIONS
from model.runtime import TRAINING, Hooks, Runtime

# What a rematerialised block keeps for the backward pass (None: remat off). Bar 'full', each also keeps the attention
# kernels' (C++ CPU, Pallas) output and log-sum-exp (O(T) per row; rerunning the kernel would cost a whole forward).
_keep_kernel = jax.checkpoint_policies.save_only_these_names(cpu_attention.REMAT_NAME, flash_attention.REMAT_NAME)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _keep_kernel),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _keep_kernel
    ),
}


@flax.struct.dataclass
class Output:
    logits_BTV: jax.Array  # float32
    hidden_BTD: jax.Array  # the last layer's output, before the final norm (for extra heads)
    aux: dict[str, Aux]  # named auxiliary terms, averaged over the layers that produce them
    extra: dict[str, jax.Array] = flax.struct.field(default_factory=dict)  # float32 logits of each extra head that ran


@dataclasses.dataclass(frozen=True)
class Group:
    """`repeats` copies of a `unit` of consecutive layers, the first at layer index `first`; params under `name`."""

    unit: tuple[LayerSpec, ...]
    repeats: int
    first: int
    name: str


def layer_groups(cfg: ModelConfig) -> tuple[Group, ...]:
    """Cuts the layer pattern greedily into runs of a repeating unit: at each layer, the unit (of any length) whose
    repeats cover the most layers, the shortest on ties; a layer that starts no repeat is a group of its own."""
    specs, runs, i = cfg.layer_specs(), [], 0
    while i < len(specs):
        best = (1, 1)  # (unit length, repeats)
        for p in range(1, (len(specs) - i) // 2 + 1):
            r = 1
            while specs[i + r * p : i + (r + 1) * p] == specs[i : i + p]:
                r += 1
            if r >= 2 and p * r > best[0] * best[1]:
                best = (p, r)
        runs.append((specs[i : i + best[0]], best[1], i))
        i += best[0] * best[1]
    if len(runs) == 1:
        return (Group(*runs[0], "layers"),)
    return tuple(Group(*run, f"layers_{g}") for g, run in enumerate(runs))


def _block_class(cfg: ModelConfig, rt: Runtime, unrolled: bool) -> type[nn.Module]:
    if REMAT_POLICIES[cfg.remat] is None or rt.decode is not None:
        return Block
    # Inside a loop XLA cannot merge a layer's recomputation with its forward pass, but once layers are unrolled
    # (a Python loop, scan_unroll > 1, several layers per unit) it would, undoing remat, unless CSE is prevented.
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=unrolled)


class Unit(nn.Module):
    """Several consecutive layers scanned as one step of a group (e.g. three local layers and a global one)."""

    cfg: ModelConfig
    unit: tuple[LayerSpec, ...]
    rt: Runtime = TRAINING

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask: Mask):
        block, aux = _block_class(self.cfg, self.rt, unrolled=True), []
        for j, spec in enumerate(self.unit):
            x_BTD, terms = block(self.cfg, spec, self.rt, name=f"block_{j}")(x_BTD, mask)
            aux.append(terms)
        return x_BTD, aux


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Params of scanned groups as the unrolled stack (scan_layers=False) names them: layer_i."""
    groups = layer_groups(cfg)
    if not any(g.name in params for g in groups):
        return params  # already unrolled
    flat = {k: v for k, v in params.items() if not any(k == g.name for g in groups)}
    for g in groups:
        if g.name not in params:  # e.g. non-trained state, which only some groups keep
            continue
        for r in range(g.repeats):
            for j in range(len(g.unit)):
                tree = params[g.name] if len(g.unit) == 1 else params[g.name][f"block_{j}"]
                flat[f"layer_{g.first + r * len(g.unit) + j}"] = jax.tree.map(lambda x, r=r: x[r], tree)
    return flat


def stack_layers(flat: dict, cfg: ModelConfig) -> dict:
    """The inverse of `unstack_layers`: layer_i params stacked into the scanned groups that hold them."""
    if not cfg.scan_layers:
        return flat
    out = {k: v for k, v in flat.items() if not k.startswith("layer_")}
    for g in layer_groups(cfg):
        units = [
            jax.tree.map(
                lambda *xs: jnp.stack(xs), *[flat[f"layer_{g.first + r * len(g.unit) + j}"] for r in range(g.repeats)]
            )
            for j in range(len(g.unit))
        ]
        out[g.name] = units[0] if len(g.unit) == 1 else {f"block_{j}": u for j, u in enumerate(units)}
    return out


class Transformer(nn.Module):
    """`rt` (model/runtime.py) says how it runs: decoding (`rt.decode`, a DecodeConfig) adds each layer's decode
    cache (see its attention kind) for incremental sampling, with the same params; `rt.hooks` carry the mesh's
    collectives (e.g. ring attention replacing the implementation `cfg.attention_impl` chooses); `rt.weights` is
    the format every weight is read in (model/weights.py). Non-trained state (the "state" collection) changes only where the caller makes it
    mutable: the train step does, evaluation and decoding do not.

    With `scan_layers`, each layer group is one `nn.scan` whose loop runs `scan_unroll` layers per trip. The loop
    keeps what each layer saves for the backward pass in stacked [layers, ...] buffers, which XLA fills with
    zeros and copies into and out of every step; fully unrolled (scan_unroll >= num_layers), XLA keeps no such
    buffers but compiles one copy of the layer per layer (BENCHMARKS.md: with remat off, 1.07x on
    configs/tiny.py's training step on a CPU and 1.31x on configs/bench_10m.py's in bf16 on an H200)."""

    cfg: ModelConfig
    rt: Runtime = TRAINING

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, segments_BT=None) -> jax.Array:
        """Float32 logits [B, T, vocab] (see `forward`)."""
        return self.forward(tokens_BT, positions_BT, segments_BT).logits_BTV

    @nn.compact
    def forward(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segments_BT: jax.Array | None = None,
        *,
        in_order: bool | None = None,
        ahead_BTA: jax.Array | None = None,
        logits_at_BK: jax.Array | None = None,
    ) -> Output:
        """Positions default to 0..T-1; -1 marks padding, which no token attends to. `segments_BT` (document ids,
        with positions restarting at each document) keeps attention inside documents. `in_order`: the tokens are
        in sequence order, so no key after its query is ever visible (default: positions were not given).
        `ahead_BTA` (training): column j holds the token j + 1 after each position (column 0: the targets), for
        the extra heads the config turns on (model/heads.py), which then run (their logits in `extra`, under
        their names) and add their losses to `aux`. `logits_at_BK` (scoring): the main head runs only at these
        positions of each row (indices into T), so `logits_BTV` is [B, K, vocab]; with a large vocabulary the head
        is a sizeable share of a small model's FLOPs, and scoring reads a few positions of each row."""
        cfg = self.cfg
        in_order = positions_BT is None if in_order is None else in_order
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        rt = self.rt
        embedding = token_embedding(cfg, rt)
        x_BTD = embedding(tokens_BT)
        scheme = POSITIONS[cfg.position]
        if scheme.embed is not None:
            x_BTD = x_BTD + scheme.embed(cfg, name="pos_embed")(jnp.maximum(positions_BT, 0)).astype(x_BTD.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

        mask = Mask.self_attention(positions_BT, segments_BT, in_order=in_order)
        aux: list[dict[str, Aux]] = []
        if cfg.scan_layers:
            for g in layer_groups(cfg):
                p = len(g.unit)
                if p == 1:
                    body, extra = _block_class(cfg, rt, unrolled=cfg.scan_unroll > 1), (g.unit[0],)
                else:
                    body, extra = Unit, (g.unit,)
                stack = nn.scan(
                    body,
                    variable_axes={"params": 0, "cache": 0, "state": 0, CALIBRATION: 0},
                    split_rngs={"params": True, "noise": True},  # noise: e.g. a router's jitter, per layer
                    in_axes=nn.broadcast,
                    length=g.repeats,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                    unroll=min(g.repeats, max(1, cfg.scan_unroll // p)),
                )
                x_BTD, terms = stack(cfg, *extra, rt, name=g.name)(x_BTD, mask)
                aux.extend(terms if p > 1 else [terms])
        else:
            block = _block_class(cfg, rt, unrolled=True)
            for i, spec in enumerate(cfg.layer_specs()):
                x_BTD, terms = block(cfg, spec, rt, name=f"layer_{i}")(x_BTD, mask)
                aux.append(terms)

        hidden_BTD = x_BTD
        logits_of = output_head(cfg, rt, embedding)
        read_BTD = hidden_BTD if logits_at_BK is None else jnp.take_along_axis(hidden_BTD, logits_at_BK[..., None], 1)
        out = Output(logits_of(read_BTD), hidden_BTD, mean_over_layers(aux))
        for name, head in heads_lib.active(cfg).items():
            if ahead_BTA is None and head.training_only:
                continue
            logits = head.forward(cfg, rt, name, hidden_BTD, ahead_BTA, mask, embedding, logits_of)
            aux_terms = {} if ahead_BTA is None else head.losses(cfg, logits, ahead_BTA)
            out = out.replace(extra={**out.extra, name: logits}, aux={**out.aux, **aux_terms})
        return out


def init_variables(model: Transformer, rng: jax.Array) -> dict:
    """The model's initial variables ({"params": ...} plus {"state": ...} where a layer keeps non-trained state),
    boxed with their logical axis names, the extra heads' included (model/heads.py). Plain attention: variables do
    not depend on how attention is computed (ring attention splits the batch, which a 1-row dummy cannot be)."""
    dummy_BT = jnp.zeros((1, model.cfg.max_seq_len), jnp.int32)
    ahead_BTA = jnp.zeros((*dummy_BT.shape, 1 + heads_lib.extra_tokens(model.cfg)), jnp.int32)  # the heads run too
    plain = model.clone(rt=dataclasses.replace(model.rt, decode=None, hooks=Hooks()))
    variables = plain.init(rng, dummy_BT, ahead_BTA=ahead_BTA, method="forward")
    return {k: v for k, v in variables.items() if k in ("params", "state")}


def logits(cfg: ModelConfig, params: dict, input_ids_BT) -> jax.Array:
    """Float32 logits [B, T, vocab] of token ids at positions 0..T-1 (no padding): one call, nothing to build.
    `params`: the params tree, or the variables {"params": ..., "state": ...} of a model with non-trained state."""
    variables = params if "params" in params else {"params": params}
    return jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(input_ids_BT, jnp.int32))
