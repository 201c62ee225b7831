"""The typed, frozen model configuration: the only thing model/ reads.

Built and validated from a ConfigDict by `training.config`; model code trusts it.
"""

from __future__ import annotations

import dataclasses

from model.moe import MoEConfig
from model.rope import RopeScaling


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention's sizes (`model.attention='mla'`, model/mla.py; DeepSeek-V2/V3's names).

    Lives here rather than in model/mla.py because ModelConfig holds it and model/mla.py imports ModelConfig."""

    q_lora_rank: int = 0  # width of the compressed query (0: queries projected straight from d_model)
    kv_lora_rank: int = 128  # width of the latent keys and values are rebuilt from (what decoding caches)
    qk_nope_head_dim: int = 64  # per-head query/key channels without RoPE (rebuilt from the latent)
    qk_rope_head_dim: int = 32  # per-head query channels with RoPE; the key's are one vector shared by all heads
    v_head_dim: int = 64  # per-head value channels
    # How decoding attends over the cache: 'absorbed' (the up-projections folded into the query and the output)
    # or 'naive' (full K/V rebuilt from the cached latent, the reference). Not a training config key: infer.py's
    # --mla_decode sets it (training.config.DERIVED), and both give the same logits.
    decode: str = "absorbed"


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction heads (model/mtp.py owns them): `num_heads` extra depths, 0 = off."""

    num_heads: int = 0  # depth d predicts the token d + 1 after each position (beside the main head's next one)
    style: str = "sequential"  # a key of model.mtp.STYLES: 'sequential' (DeepSeek-V3) or 'parallel' (Gloeckle et al.)
    loss_weight: float = 0.3  # the training loss adds loss_weight * (mean over depths of the heads' cross-entropy)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 257
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 1024
    attention: str = "gqa"  # a key of model.kinds.ATTENTION_KINDS
    mlp: str = "swiglu"  # a key of model.kinds.MLP_KINDS
    moe: MoEConfig = MoEConfig()  # experts, routing and dispatch of model.mlp='moe' (model/moe.py)
    norm: str = "rmsnorm"  # a key of model.layers.NORMS
    norm_eps: float = 1e-6
    position: str = "rope"  # a key of model.positions.POSITIONS
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = RopeScaling()  # context extension: linear, llama3 or yarn (model/rope.py)
    mla: MLAConfig = MLAConfig()  # sizes of attention='mla' (unused by other kinds)
    mtp: MTPConfig = MTPConfig()  # multi-token prediction heads (model/mtp.py)
    sliding_window: int = 0  # keys at query position - key position >= window are masked (0: no window)
    global_every: int = 0  # with a window: layer i attends globally when (i + 1) % global_every == 0 (0: none)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3, OLMo 2)
    attn_logit_softcap: float = 0.0  # attention logits -> cap * tanh(logits / cap) (Gemma 2; 0: off)
    final_logit_softcap: float = 0.0  # output logits -> cap * tanh(logits / cap) (0: off)
    max_seq_len: int = 256  # table size of learned positions; longest sequence of the model
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    scan_layers: bool = True  # nn.scan over layers (fast compile) or an unrolled Python loop
    scan_unroll: int = 1  # layers per trip of the scanned stack's loop; >= num_layers: none (see Transformer)
    remat: str = "none"  # a key of model.transformer.REMAT_POLICIES
    attention_impl: str = "auto"  # 'auto' or a key of model.attention.IMPLEMENTATIONS
    causal_blocks: int = 4  # query blocks of causal attention over positions 0..T-1; block i skips later keys
    parametrization: str = "sp"  # 'sp' (standard) or 'mup' (maximal update parametrization)
    mup_base_width: int = 256  # d_model at which muP and SP coincide (where the learning rate was tuned)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # read back from a config.json
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.mla, dict):
            object.__setattr__(self, "mla", MLAConfig(**self.mla))
        if isinstance(self.mtp, dict):
            object.__setattr__(self, "mtp", MTPConfig(**self.mtp))

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

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """What each layer is: the per-layer pattern the transformer groups into scanned runs."""
        return tuple(LayerSpec(self.attention, self.window_of(i), self.mlp_of(i)) for i in range(self.num_layers))

    def mlp_of(self, layer: int) -> str:
        """Layer `layer`'s MLP kind: `model.mlp`, unless that kind has a per-layer pattern (`layer_kind`: MoE
        keeps some layers dense)."""
        from model.kinds import MLP_KINDS  # the kinds import this module

        pattern = getattr(MLP_KINDS.get(self.mlp), "layer_kind", None)
        return self.mlp if pattern is None else pattern(self, layer)

    def window_of(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: global): every layer is local when a window is set, but for every
        `global_every`-th one."""
        if self.sliding_window == 0 or (self.global_every and (layer + 1) % self.global_every == 0):
            return 0
        return self.sliding_window


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer's kinds: layers with equal specs have the same parameters' shapes and run the same code."""

    attention: str  # a key of model.kinds.ATTENTION_KINDS
    window: int  # sliding window of its attention (0: global)
    mlp: str  # a key of model.kinds.MLP_KINDS
