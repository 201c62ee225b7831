"""Parameter and FLOPs accounting: the one count that MFU, the dry run, sweep planning and scaling fits use.

Counts are analytic (from the config and each layer's kinds, which own their own counts), so they are available
before anything is built; tests check them against the initialised parameters and against XLA's own FLOP count.
"""

from __future__ import annotations

import dataclasses

from model import heads as heads_lib
from model.config import ModelConfig
from model.kinds import ATTENTION_KINDS, MLP_KINDS
from model.layers import NORMS
from model.positions import POSITIONS


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # used by each token (below total where only some experts run)
    embedding: int  # token embedding, untied head and learned positions

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    norm_params = cfg.d_model * NORMS[cfg.norm].vectors
    total = active = norm_params  # the final norm
    for spec in cfg.layer_specs():
        attention, mlp = ATTENTION_KINDS[spec.attention], MLP_KINDS[spec.mlp]
        shared = attention.param_count(cfg) + 2 * norm_params
        total += shared + mlp.param_count(cfg)
        active += shared + mlp.matmul_params(cfg)
    for head in heads_lib.active(cfg).values():  # extra heads: every token uses all of a head where it runs
        total += head.param_count(cfg)
        active += head.param_count(cfg)
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if POSITIONS[cfg.position].bounded:
        embedding += cfg.max_seq_len * cfg.d_model
    return ParamCounts(total=total + embedding, active=active + embedding, embedding=embedding)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights each token is multiplied by in the forward pass (all layers' active weights plus the output head)."""
    per_layer = sum(
        ATTENTION_KINDS[s.attention].matmul_params(cfg) + MLP_KINDS[s.mlp].matmul_params(cfg) for s in cfg.layer_specs()
    )
    return per_layer + cfg.d_model * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of q.k^T and probs.v per token, over the full (unmasked) T x T square, or T x window for
    sliding-window layers (the keys a query can see at most)."""
    return sum(
        ATTENTION_KINDS[s.attention].attention_flops(cfg, min(seq_len, s.window) if s.window else seq_len)
        for s in cfg.layer_specs()
    )


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> int:
    """Matmul FLOPs per token: 2N forward with N the active parameters (6N training, Kaplan et al.) plus the
    attention term, and the extra heads' (model/heads.py) where they run (training-only ones in training only)."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    for head in heads_lib.active(cfg).values():
        if training or not head.training_only:
            forward += 2 * head.matmul_params(cfg) + head.attention_flops(cfg, seq_len)
    return 3 * forward if training else forward
