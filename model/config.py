"""The typed, frozen model configuration: the only thing model/ reads.

`ModelConfig` is the settings every model has (`ModelConfigBase`) plus one field per config group that an entry
of the tables declares (`config_group = (name, dataclass)`, model/kinds.py): `cfg.moe` (model/moe.py's
MoEConfig), `cfg.mla` (model/mla.py's MLAConfig), `cfg.mtp` (model/mtp.py's MTPConfig). A new kind with
settings of its own is its module and its table entry; nothing here names it. Imports run one way: this module
imports the tables, whose modules import it only for type checking.

Built and validated from a ConfigDict by `training.config`; model code trusts it.
"""

from __future__ import annotations

import dataclasses
import functools

from model import mtp
from model.kinds import ATTENTION_KINDS, MLP_KINDS, LayerSpec
from model.rope import RopeScaling

__all__ = [
    "GROUPS",
    "TABLES",
    "LayerSpec",
    "LoraConfig",
    "ModelConfig",
    "ModelConfigBase",
    "derived",
    "settable_fields",
]

# The tables a config chooses entries from, by the key that chooses (a dotted key is a field of a group).
TABLES: dict[str, dict[str, type]] = {"attention": ATTENTION_KINDS, "mlp": MLP_KINDS, "mtp.style": mtp.STYLES}


def _groups() -> dict[str, type]:
    groups = {}
    for table in TABLES.values():
        for entry in table.values():
            if (group := getattr(entry, "config_group", None)) is not None:
                name, cls = group
                if groups.setdefault(name, cls) is not cls:
                    raise TypeError(f"two config groups named {name!r}: {groups[name].__name__}, {cls.__name__}")
    return groups


# Group name -> its frozen dataclass, as the tables' entries declare them when this module is imported (an entry
# added to a table later, as tests/toy_kinds.py adds one, is chosen and checked but brings no group).
GROUPS: dict[str, type] = _groups()


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al. 2021): each weight named in `targets` (keys of model.weights.LORA_TARGETS, MoE experts
    included) reads as W + (alpha / rank) A B with trained low-rank factors A [in, rank] and B [rank, out] (B starts
    at zero) and a frozen base W, kept in NF4 with `base_quant='nf4'` (QLoRA); `dropout` drops the adapters'
    inputs while training; `lr_ratio` is B's learning rate over A's (LoRA+, Hayou et al. 2024: 1 is plain LoRA).
    rank 0: off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    base_quant: str = ""  # '' (float) or 'nf4'
    lr_ratio: float = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def derived(default, source: str):
    """A field filled in from elsewhere, not a config key: `source` says from what (training.config refuses it in a
    config, `settable_fields` leaves it out)."""
    return dataclasses.field(default=default, metadata={"derived": source})


def settable_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config dataclass that a config may set (all but the derived ones)."""
    return [f for f in dataclasses.fields(cls) if "derived" not in f.metadata]


@dataclasses.dataclass(frozen=True)
class ModelConfigBase:
    """Every model's settings; ModelConfig adds the kinds' config groups."""

    vocab_size: int = derived(257, "the tokenizer's vocabulary")
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 1024
    attention: str = "gqa"  # a key of model.kinds.ATTENTION_KINDS
    mlp: str = "swiglu"  # a key of model.kinds.MLP_KINDS
    norm: str = "rmsnorm"  # a key of model.layers.NORMS
    norm_eps: float = 1e-6
    position: str = "rope"  # a key of model.positions.POSITIONS
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = RopeScaling()  # context extension: linear, llama3 or yarn (model/rope.py)
    sliding_window: int = 0  # keys at query position - key position >= window are masked (0: no window)
    global_every: int = 0  # with a window: layer i attends globally when (i + 1) % global_every == 0 (0: none)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3, OLMo 2)
    attn_logit_softcap: float = 0.0  # attention logits -> cap * tanh(logits / cap) (Gemma 2; 0: off)
    final_logit_softcap: float = 0.0  # output logits -> cap * tanh(logits / cap) (0: off)
    max_seq_len: int = derived(256, "data.seq_len")  # learned positions' table size; the model's longest sequence
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
    lora: LoraConfig = LoraConfig()  # low-rank adapters on a frozen base (model/weights.py's LoRA; model/lora)

    def __post_init__(self):
        for field in dataclasses.fields(self):  # a group read back from a config.json is a dict
            value, default = getattr(self, field.name), field.default
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                object.__setattr__(self, field.name, type(default)(**value))

    def choice(self, key: str) -> str:
        """The value of a key of TABLES, e.g. `choice("mtp.style")` is `self.mtp.style`."""
        return functools.reduce(getattr, key.split("."), self)

    def kinds(self) -> list[type]:
        """The entries of TABLES this config chooses (unknown keys left out: training.config rejects them)."""
        return [table[self.choice(key)] for key, table in TABLES.items() if self.choice(key) in table]

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
        pattern = getattr(MLP_KINDS.get(self.mlp), "layer_kind", None)
        return self.mlp if pattern is None else pattern(self, layer)

    def window_of(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: global): every layer is local when a window is set, but for every
        `global_every`-th one."""
        if self.sliding_window == 0 or (self.global_every and (layer + 1) % self.global_every == 0):
            return 0
        return self.sliding_window


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [(name, cls, dataclasses.field(default=cls())) for name, cls in GROUPS.items()],
    bases=(ModelConfigBase,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": "ModelConfigBase's settings and the kinds' config groups."},
)
