"""The extra heads' table: heads beside the main next-token head that read the trunk's last hidden state, trained
with losses of their own (multi-token prediction today, model/mtp.py). The transformer, the accounting, the
training inputs and `init_variables` loop over the heads a config turns on and name none of them.

An entry (`HeadKind`) owns
- `active(cfg)`: whether the config turns it on;
- `extra_tokens(cfg)`: tokens a training window carries beyond the main head's seq_len + 1, for its targets;
- `forward(cfg, rt, name, trunk_BTD, ahead_BTA, mask, embedding, logits_of) -> logits`: builds its module under
  `name`, its key here (called inside the transformer's forward, so its params are `params[name]`), and runs it
  on the trunk's last hidden state (before the final norm) with the main model's token embedding and output
  head (`logits_of(h_BTD, norm=None)`); its logits are `Output.extra[name]`;
- `losses(cfg, logits, ahead_BTA) -> {name: Aux}`: the terms it adds to the forward pass's aux (with their
  weights in the training loss);
- `param_count(cfg)`, `matmul_params(cfg)` (weights each token is multiplied by, a shared output head
  included) and `attention_flops(cfg, seq_len)`: its counts for model/accounting.py;
- `training_only`: it runs only where the targets are given (`ahead_BTA`: training), so evaluation and decoding
  skip it and only training FLOPs count it (its params are always counted: they are in the tree).

`ahead_BTA[b, t, j]` is the token j + 1 after position t (column 0: the main head's target); a window of
T + 1 + `extra_tokens(cfg)` tokens gives every column the active heads read (`ahead`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import jax
import jax.numpy as jnp

from model import mtp
from model.aux import Aux

if TYPE_CHECKING:  # model.config imports model.mtp (its config group), not this table
    from model.config import ModelConfig
    from model.mask import Mask
    from model.runtime import Runtime


class HeadKind(Protocol):
    training_only: bool

    def active(self, cfg: ModelConfig) -> bool: ...

    def extra_tokens(self, cfg: ModelConfig) -> int: ...

    def forward(
        self, cfg: ModelConfig, rt: Runtime, name: str, trunk_BTD, ahead_BTA, mask: Mask, embedding, logits_of
    ) -> jax.Array: ...

    def losses(self, cfg: ModelConfig, logits: jax.Array, ahead_BTA: jax.Array) -> dict[str, Aux]: ...

    def param_count(self, cfg: ModelConfig) -> int: ...

    def matmul_params(self, cfg: ModelConfig) -> int: ...

    def attention_flops(self, cfg: ModelConfig, seq_len: int) -> int: ...


HEADS: dict[str, HeadKind] = {"mtp": mtp.Head}


def active(cfg: ModelConfig) -> dict[str, HeadKind]:
    """The heads `cfg` turns on, by name, in table order."""
    return {name: kind for name, kind in HEADS.items() if kind.active(cfg)}


def extra_tokens(cfg: ModelConfig) -> int:
    """Tokens a training window carries beyond seq_len + 1: as many as the active head reading furthest needs."""
    return max((kind.extra_tokens(cfg) for kind in active(cfg).values()), default=0)


def ahead(window_BW: jax.Array, columns: int) -> jax.Array:
    """ahead_BTA from windows of T + columns tokens: column j is the token j + 1 after each of the first T."""
    T = window_BW.shape[1] - columns
    return jnp.stack([window_BW[:, 1 + j : 1 + j + T] for j in range(columns)], axis=-1)
