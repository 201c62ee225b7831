"""The decoder-only transformer: embed -> N pre-norm blocks -> final norm -> float32 logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention, AttentionFn
from model.config import ModelConfig
from model.kernels import cpu_attention
from model.layers import MLPS, NORMS, dense
from model.positions import POSITIONS

# What a rematerialised block keeps for the backward pass (None: remat off). Bar 'full', each also keeps the C++ CPU
# attention kernel's output and log-sum-exp (O(T) per row; rerunning the kernel would cost a whole forward).
_keep_kernel = jax.checkpoint_policies.save_only_these_names(cpu_attention.REMAT_NAME)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _keep_kernel),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _keep_kernel
    ),
}


class Block(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    attention: AttentionFn | None = None
    in_order: bool = False  # positions are 0..T-1 in every row (see Attention)

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array):
        cfg, norm = self.cfg, NORMS[self.cfg.norm]
        attn = Attention(cfg, self.decode, self.attention, self.in_order, name="attn")
        x_BTD = x_BTD + attn(norm(cfg, name="attn_norm")(x_BTD), positions_BT)
        x_BTD = x_BTD + MLPS[cfg.mlp](cfg, name="mlp")(norm(cfg, name="mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        return x_BTD, None  # (carry, output) so the same module runs under nn.scan


def block_stack(cfg: ModelConfig, decode: bool) -> type[nn.Module]:
    block = Block
    if REMAT_POLICIES[cfg.remat] is not None and not decode:
        # Inside a loop XLA cannot merge a layer's recomputation with its forward pass, but once the layers are
        # unrolled (a Python loop, or scan_unroll > 1) it would, undoing remat, unless CSE is prevented.
        prevent_cse = not cfg.scan_layers or cfg.scan_unroll > 1
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=prevent_cse)
    return block


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Params of a scanned stack ("layers", stacked on axis 0) as the unrolled stack names them (layer_i)."""
    if "layers" not in params:
        return params
    per_layer = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)}
    return {**{k: v for k, v in params.items() if k != "layers"}, **per_layer}


class Transformer(nn.Module):
    """`decode=True` adds a K/V cache (see `Attention`) for incremental sampling; params are the same.
    `attention` swaps in another implementation of the attention math (e.g. ring attention).

    With `scan_layers`, the layers are one `nn.scan` whose loop runs `scan_unroll` layers per trip. The loop
    keeps what each layer saves for the backward pass in stacked [layers, ...] buffers, which XLA fills with
    zeros and copies into and out of every step; fully unrolled (scan_unroll >= num_layers), XLA keeps no such
    buffers but compiles one copy of the layer per layer (BENCHMARKS.md: with remat off, 1.07x on
    configs/tiny.py's training step on a CPU and 1.31x on configs/bench_10m.py's in bf16 on an H200)."""

    cfg: ModelConfig
    decode: bool = False
    attention: AttentionFn | None = None

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """Returns float32 logits [B, T, vocab]. Positions default to 0..T-1; -1 marks padding, which no
        token attends to."""
        cfg = self.cfg
        in_order = positions_BT is None
        if in_order:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        embedding = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            name="embed",
        )
        x_BTD = embedding(tokens_BT)
        scheme = POSITIONS[cfg.position]
        if scheme.embed is not None:
            x_BTD = x_BTD + scheme.embed(cfg, name="pos_embed")(jnp.maximum(positions_BT, 0)).astype(x_BTD.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

        block = block_stack(cfg, self.decode)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
                unroll=min(cfg.scan_unroll, cfg.num_layers),
            )
            x_BTD, _ = stack(cfg, self.decode, self.attention, in_order, name="layers")(x_BTD, positions_BT)
        else:
            for i in range(cfg.num_layers):
                x_BTD, _ = block(cfg, self.decode, self.attention, in_order, name=f"layer_{i}")(x_BTD, positions_BT)

        x_BTD = NORMS[cfg.norm](cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embedding.attend(x_BTD)
        else:
            logits_BTV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "head", std=cfg.init_std)(x_BTD)
        if cfg.width_mult != 1.0:  # muP's output multiplier keeps logits O(1) as the width grows
            logits_BTV = logits_BTV / cfg.width_mult
        logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits_BTV
