"""Parameter and FLOPs accounting: the one count that MFU, sweep planning and scaling fits use.

Counts are analytic (from the config), so they are available before anything is built; a test
checks them against the initialised parameters and against XLA's own FLOP count.
"""

from __future__ import annotations

import dataclasses

from model.config import ModelConfig
from model.layers import MLP_MATRICES


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # token embedding, untied head and learned positions

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, H, L = cfg.d_model, cfg.resolved_head_dim, cfg.num_layers
    norm_params = D * (2 if cfg.norm == "layernorm" else 1)
    attention = D * H * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = MLP_MATRICES[cfg.mlp] * D * cfg.d_ff
    per_layer = attention + mlp + 2 * norm_params
    embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    if cfg.position == "learned":
        embedding += cfg.max_seq_len * D
    return ParamCounts(total=L * per_layer + norm_params + embedding, embedding=embedding)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights each token is multiplied by in the forward pass (all layers plus the output head)."""
    D, H = cfg.d_model, cfg.resolved_head_dim
    attention = D * H * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = MLP_MATRICES[cfg.mlp] * D * cfg.d_ff
    return cfg.num_layers * (attention + mlp) + D * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of q.k^T and probs.v per token, over the full (unmasked) T x T square."""
    return cfg.num_layers * 4 * seq_len * cfg.num_heads * cfg.resolved_head_dim


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> int:
    """Matmul FLOPs per token: 2N forward (6N training, Kaplan et al.) plus the attention term."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    return 3 * forward if training else forward
