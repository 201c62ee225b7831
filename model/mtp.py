"""Multi-token prediction (MTP) heads: extra depths that predict the tokens after the next one, trained beside the
main head and used by speculative decoding (sampling/speculative.py) to draft tokens.

Both styles share the main model's token embedding and unembedding and give depth d (1-based) the job of
predicting the token d + 1 after each position t (the main head predicts t + 1):

- 'sequential' (DeepSeek-V3, section 2.2): depth d combines the previous depth's hidden state at t (depth 0: the
  trunk's last layer, before the final norm) with the embedding of token t + d: norm both, concatenate
  [embedding; hidden] (the order of DeepSeek-V3's released `eh_proj`; the paper writes it the other way round,
  which only permutes the projection's rows), project 2D -> D, run one transformer block; its output is depth
  d's hidden state. Its logits are the shared unembedding of that state through the depth's own output norm
  (`head_norm_{d}`, in place of the main final norm: DeepSeek-V3's released checkpoints keep one per depth,
  `shared_head.norm`, which model/hf maps onto it). (The blocks' own auxiliary terms, e.g. a router's, are not
  added.)
- 'parallel' (Gloeckle et al. 2024): depth d is one transformer block of its own on the trunk's last hidden state
  (the trunk is the whole main model here, so a model trained with parallel heads decodes as one without); its
  logits go through the main model's whole output head (final norm + unembedding).

Every MTP block is a full layer of the model's attention and MLP kinds with global attention (window 0), so it
keeps its own decode cache. A style is a module `(cfg, rt)` (rt: model/runtime.py) called
`(trunk_BTD, ahead_BTA, mask, embedding, logits_of, choose=None) -> (logits_KBTV, ahead_BTA)` with static
`lookahead(cfg)` (the furthest column of `ahead_BTA` its inputs read: how far drafting lags), `param_count(cfg)`
and `matmul_params(cfg)`. `ahead_BTA[b, t, j]` is the token j + 1 after position t (column 0: the main head's
target); `choose(d, logits_BTV, ahead_BTA)` (drafting) may fill in the tokens depth d has just drafted before the
next depth reads them.

`Head` is MTP's entry in the extra heads' table (model/heads.py, "mtp"): when it is on, how many more tokens a
training window carries, its module, its losses and its counts; the transformer, the accounting and the training
inputs reach MTP only through that table. `Drafter` runs the heads alone for speculative decoding.

As model/kinds.py's entries do, each entry of STYLES declares its config group, `model.mtp` (MTPConfig), and its
rules (`config_group`, `config_errors`); model.config chooses an entry of STYLES by `model.mtp.style`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.aux import Aux
from model.block import Block
from model.kinds import ATTENTION_KINDS, MLP_KINDS, LayerSpec
from model.layers import NORMS, dense, output_head, token_embedding
from model.mask import Mask
from model.runtime import Runtime

if TYPE_CHECKING:  # model.config builds ModelConfig from the groups of STYLES' entries, MTPConfig among them
    from model.config import ModelConfig

Choose = Callable[[int, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction heads, `cfg.mtp`: `num_heads` extra depths, 0 = off."""

    num_heads: int = 0  # depth d predicts the token d + 1 after each position (beside the main head's next one)
    style: str = "sequential"  # a key of STYLES: 'sequential' (DeepSeek-V3) or 'parallel' (Gloeckle et al.)
    loss_weight: float = 0.3  # the training loss adds loss_weight * (mean over depths of the heads' cross-entropy)


def config_errors(cfg: ModelConfig) -> list[tuple[bool, str, object, str]]:
    """training.config's rules for model.mtp (model.mtp.style, the key of STYLES, is checked with the tables'):
    (condition, key, value, what is allowed)."""
    m = cfg.mtp
    return [
        (m.num_heads >= 0, "model.mtp.num_heads", m.num_heads, "must be >= 0 (0: no multi-token prediction)"),
        (m.loss_weight >= 0, "model.mtp.loss_weight", m.loss_weight, "must be >= 0"),
    ]


def _block(cfg: ModelConfig, rt: Runtime, name: str):
    return Block(cfg, block_spec(cfg), rt, name=name)


def block_spec(cfg: ModelConfig) -> LayerSpec:
    """Every MTP block: the model's attention and MLP kinds, attending globally."""
    return LayerSpec(cfg.attention, 0, cfg.mlp)


def _block_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, weights each token is multiplied by) of one MTP block."""
    spec, norms = block_spec(cfg), 2 * cfg.d_model * NORMS[cfg.norm].vectors
    attention, mlp = ATTENTION_KINDS[spec.attention], MLP_KINDS[spec.mlp]
    total = attention.param_count(cfg) + mlp.param_count(cfg) + norms
    return total, attention.matmul_params(cfg) + mlp.matmul_params(cfg)


class Sequential(nn.Module):
    cfg: ModelConfig
    rt: Runtime

    config_group = ("mtp", MTPConfig)
    config_errors = staticmethod(config_errors)

    @nn.compact
    def __call__(self, trunk_BTD, ahead_BTA, mask: Mask, embedding, logits_of, choose: Choose | None = None):
        cfg, norm = self.cfg, NORMS[self.cfg.norm]
        h_BTD, logits = trunk_BTD, []
        for d in range(1, cfg.mtp.num_heads + 1):
            e_BTD = embedding(ahead_BTA[..., d - 1]).astype(h_BTD.dtype)  # token t + d
            x_BTE = jnp.concatenate(
                [norm(cfg, name=f"embed_norm_{d}")(e_BTD), norm(cfg, name=f"hidden_norm_{d}")(h_BTD)], axis=-1
            )
            x_BTD = dense(cfg, self.rt, cfg.d_model, ("mlp", "embed"), f"proj_{d}")(x_BTE)
            h_BTD, _ = _block(cfg, self.rt, f"block_{d}")(x_BTD, mask)
            logits.append(logits_of(h_BTD, norm(cfg, name=f"head_norm_{d}")))
            if choose is not None:
                ahead_BTA = choose(d, logits[-1], ahead_BTA)
        return jnp.stack(logits), ahead_BTA

    @staticmethod
    def lookahead(cfg: ModelConfig) -> int:
        return cfg.mtp.num_heads  # the last depth reads token t + num_heads

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        D = cfg.d_model
        per_depth = _block_params(cfg)[0] + 3 * D * NORMS[cfg.norm].vectors + 2 * D * D  # 3 norms: embed, hidden, head
        return cfg.mtp.num_heads * per_depth

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        return cfg.mtp.num_heads * (_block_params(cfg)[1] + 2 * cfg.d_model * cfg.d_model)


class Parallel(nn.Module):
    cfg: ModelConfig
    rt: Runtime

    config_group = ("mtp", MTPConfig)
    config_errors = staticmethod(config_errors)

    @nn.compact
    def __call__(self, trunk_BTD, ahead_BTA, mask: Mask, embedding, logits_of, choose: Choose | None = None):
        logits = []
        for d in range(1, self.cfg.mtp.num_heads + 1):
            h_BTD, _ = _block(self.cfg, self.rt, f"block_{d}")(trunk_BTD, mask)
            logits.append(logits_of(h_BTD))
            if choose is not None:
                ahead_BTA = choose(d, logits[-1], ahead_BTA)
        return jnp.stack(logits), ahead_BTA

    @staticmethod
    def lookahead(cfg: ModelConfig) -> int:
        return 0  # every depth reads only the trunk

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        return cfg.mtp.num_heads * _block_params(cfg)[0]

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        return cfg.mtp.num_heads * _block_params(cfg)[1]


STYLES: dict[str, type[nn.Module]] = {"sequential": Sequential, "parallel": Parallel}


def losses(cfg: ModelConfig, logits_KBTV: jax.Array, ahead_BTA: jax.Array) -> dict[str, Aux]:
    """`mtp_loss` (the mean over depths, weighted by loss_weight in the training loss) and `mtp_loss_<d>` (logged
    only): each depth's mean cross-entropy against its targets (column d of ahead_BTA). No z-loss or label
    smoothing: those shape the main head only."""
    K = logits_KBTV.shape[0]
    logz_KBT = jax.nn.logsumexp(logits_KBTV, axis=-1)
    targets_KBT = jnp.moveaxis(ahead_BTA[..., 1 : K + 1], -1, 0)
    target_logit_KBT = jnp.take_along_axis(logits_KBTV, targets_KBT[..., None], axis=-1)[..., 0]
    per_depth_K = jnp.mean(logz_KBT - target_logit_KBT, axis=(1, 2))
    terms = {f"mtp_loss_{d + 1}": Aux(per_depth_K[d]) for d in range(K)}
    return {"mtp_loss": Aux(jnp.mean(per_depth_K), cfg.mtp.loss_weight), **terms}


def lookahead(cfg: ModelConfig) -> int:
    return STYLES[cfg.mtp.style].lookahead(cfg)


class Head:
    """Multi-token prediction as the entry "mtp" of the extra heads' table (model/heads.py): on when
    model.mtp.num_heads > 0, run in training only, its module the style's, params under "mtp"."""

    training_only = True
    losses = staticmethod(losses)

    @staticmethod
    def active(cfg: ModelConfig) -> bool:
        return cfg.mtp.num_heads > 0

    @staticmethod
    def extra_tokens(cfg: ModelConfig) -> int:
        return cfg.mtp.num_heads  # depth d's targets run d further than the main head's

    @staticmethod
    def forward(cfg: ModelConfig, rt: Runtime, name: str, trunk_BTD, ahead_BTA, mask: Mask, embedding, logits_of):
        """Float32 logits [K, B, T, V] of the K depths."""
        logits_KBTV, _ = STYLES[cfg.mtp.style](cfg, rt, name=name)(trunk_BTD, ahead_BTA, mask, embedding, logits_of)
        return logits_KBTV

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        return STYLES[cfg.mtp.style].param_count(cfg)

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        """The heads' weights each token is multiplied by, their shared output head included."""
        return STYLES[cfg.mtp.style].matmul_params(cfg) + cfg.mtp.num_heads * cfg.d_model * cfg.vocab_size

    @staticmethod
    def attention_flops(cfg: ModelConfig, seq_len: int) -> int:
        spec = block_spec(cfg)
        return cfg.mtp.num_heads * ATTENTION_KINDS[spec.attention].attention_flops(cfg, seq_len)


class Drafter(nn.Module):
    """The MTP heads alone, with the main model's embedding and output head (the same parameter names, so it runs
    on a subset of the transformer's params: `params_of`), decoding with their own caches: what speculative
    decoding drafts with."""

    cfg: ModelConfig
    rt: Runtime  # decoding

    @nn.compact
    def __call__(self, trunk_BTD, ahead_BTA, positions_BT, choose: Choose | None = None):
        embedding = token_embedding(self.cfg, self.rt)
        logits_of = output_head(self.cfg, self.rt, embedding)
        mask = Mask.self_attention(positions_BT)
        heads = STYLES[self.cfg.mtp.style](self.cfg, self.rt, name="mtp")  # the transformer's name for them (HEADS)
        return heads(trunk_BTD, ahead_BTA, mask, embedding, logits_of, choose)

    @staticmethod
    def params_of(params: dict) -> dict:
        return {k: v for k, v in params.items() if k in ("embed", "final_norm", "head", "mtp")}
