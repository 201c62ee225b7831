"""The typed, frozen model configuration: the only thing model/ reads.

Built and validated from a ConfigDict by `training.config`; model code trusts it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 257
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 1024
    mlp: str = "swiglu"  # a key of model.layers.MLPS
    norm: str = "rmsnorm"  # a key of model.layers.NORMS
    norm_eps: float = 1e-6
    position: str = "rope"  # a key of model.positions.POSITIONS
    rope_theta: float = 10_000.0
    max_seq_len: int = 256  # table size of learned positions; longest sequence of the model
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    scan_layers: bool = True  # nn.scan over layers (fast compile) or an unrolled Python loop
    scan_unroll: int = 1  # layers per trip of the scanned stack's loop; >= num_layers: none (see Transformer)
    remat: str = "none"  # a key of model.transformer.REMAT_POLICIES
    attention_impl: str = "auto"  # a key of model.attention.ATTENTION_IMPLS
    causal_blocks: int = 4  # query blocks of causal attention over positions 0..T-1; block i skips later keys
    parametrization: str = "sp"  # 'sp' (standard) or 'mup' (maximal update parametrization)
    mup_base_width: int = 256  # d_model at which muP and SP coincide (where the learning rate was tuned)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def width_mult(self) -> float:
        """muP's width multiplier d_model / base width (1 under SP)."""
        return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

    @property
    def group_size(self) -> int:
        """Query heads sharing one K/V head (1: MHA, num_heads: MQA)."""
        return self.num_heads // self.num_kv_heads
