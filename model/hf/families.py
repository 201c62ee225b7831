"""The Hugging Face architectures we read and write, one `Family` each: how its config.json maps onto a
ModelConfig (both ways) and where each of our parameters is stored in its checkpoints.

A family is one entry of `FAMILIES` (by `architectures[0]` of config.json); exporting picks the first family
in `EXPORT_ORDER` that can represent the config. Everything a family cannot represent is an `HFError` naming
the key, in either direction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

from model import mtp as mtp_lib
from model.config import LayerSpec, ModelConfig
from model.hf.tensors import Entry, experts, linear, stored
from model.mla import MLAConfig
from model.moe import MoEConfig
from model.mtp import MTPConfig
from model.rope import RopeScaling


class HFError(ValueError):
    """A Hugging Face directory or config we cannot read or write (one line, naming the file, key or tensor)."""


# config.json's rope keys (transformers 5 `rope_parameters`, or `rope_theta` + `rope_scaling` before it) -> ours.
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
_ROPE_FIELDS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_len",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
}
_ROPE_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def rope_from_hf(hf: dict) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from either form of config.json's rope keys."""
    scaling = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise HFError(f"config.json: rope_type={kind!r}: one of {', '.join(map(repr, _ROPE_TYPES))}")
    if partial := scaling.get("partial_rotary_factor"):
        if partial != 1.0:
            raise HFError(f"config.json: partial_rotary_factor={partial!r}: only 1.0 (RoPE on every channel)")
    if scaling.get("attention_factor") is not None:
        raise HFError(f"config.json: rope attention_factor={scaling['attention_factor']!r}: not supported (unset)")
    fields = {}
    for key, value in scaling.items():
        if key in _ROPE_FIELDS and value is not None:
            fields[_ROPE_FIELDS[key]] = value
        elif key not in _ROPE_IGNORED and key not in ("attention_factor", "truncate"):
            raise HFError(f"config.json: rope key {key!r} is not supported")
    if scaling.get("truncate", True) is not True:
        raise HFError("config.json: rope truncate=false is not supported (only YaRN's default, true)")
    if _ROPE_TYPES[kind] == "none":
        return theta, RopeScaling()
    if _ROPE_TYPES[kind] == "yarn" and "original_max_len" not in fields:
        fields["original_max_len"] = hf.get("max_position_embeddings", 0)
    return theta, RopeScaling(type=_ROPE_TYPES[kind], **fields)


def rope_to_hf(cfg: ModelConfig) -> dict:
    """Both forms (transformers 5 reads `rope_parameters`, earlier versions and vLLM `rope_theta`/`rope_scaling`)."""
    s = cfg.rope_scaling
    if s.type == "none":
        return {"rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    kind = {v: k for k, v in _ROPE_TYPES.items()}[s.type]
    back = {v: k for k, v in _ROPE_FIELDS.items()}
    wanted = {
        "linear": ("factor",),
        "llama3": ("factor", "original_max_len", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor", "original_max_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
    }[s.type]
    fields = {back[f]: getattr(s, f) for f in wanted if not (f == "mscale_all_dim" and not s.mscale_all_dim)}
    return {
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": kind, **fields},
        "rope_parameters": {"rope_type": kind, "rope_theta": cfg.rope_theta, **fields},
    }


def _require(hf: dict, key: str, allowed, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFError(f"config.json: {key}={value!r}: only {' or '.join(map(repr, allowed))} is supported")


def _dtype(hf: dict) -> str:
    value = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    if value not in ("float32", "bfloat16", "float16"):
        raise HFError(f"config.json: dtype={value!r}: one of 'float32', 'bfloat16', 'float16'")
    return value


def swiglu_entries(p: str, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Entry]:
    return {
        ("params", *prefix, "gate", "kernel"): linear(p + "gate_proj.weight"),
        ("params", *prefix, "up", "kernel"): linear(p + "up_proj.weight"),
        ("params", *prefix, "down", "kernel"): linear(p + "down_proj.weight"),
    }


# A layer's MLP as a family stores it: (cfg, the layer's prefix "model.layers.{i}.") -> its entries, as (collection,
# *path in the MLP).
MLPEntries = Callable[[ModelConfig, str], dict[tuple[str, ...], Entry]]

# Keys of `Family.kinds` whose choice builds something only in some models: MTP's style, only with MTP heads.
_BUILT_WHEN: dict[str, Callable[[ModelConfig], bool]] = {"mtp.style": lambda cfg: cfg.mtp.num_heads > 0}


@dataclasses.dataclass(frozen=True)
class Family:
    """Llama's layout, which the other dense families extend: GQA attention with RoPE (half-split pairs, as
    ours), RMSNorm before attention and MLP, a SwiGLU MLP, optionally tied embeddings."""

    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"

    # The kinds it stores, by the config key that chooses them from its table (`cfg.choice(key)`: model.config's
    # TABLES, model.layers.NORMS, model.moe.ROUTERS, ...): a model choosing another is one it cannot represent. A
    # family without `mtp.style` stores no MTP heads.
    kinds: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("gqa",),
        "mlp": ("swiglu",),
        "norm": ("rmsnorm",),
        "position": ("rope",),
    }
    # What the refusal of another kind adds, by key, where the choice alone does not say why.
    kind_notes: ClassVar[dict[str, str]] = {}
    # Each layer's MLP, by its kind (`LayerSpec.mlp`: `model.mlp` or, for MoE, a dense kind on some layers).
    mlps: ClassVar[dict[str, MLPEntries]] = {"swiglu": lambda cfg, p: swiglu_entries(p + "mlp.")}

    # -- config.json -> ModelConfig ------------------------------------------------------------------------------
    def from_hf(self, hf: dict) -> ModelConfig:
        _require(hf, "hidden_act", ("silu",), "silu")
        _require(hf, "attention_bias", (False,), False)
        _require(hf, "mlp_bias", (False,), False)
        _require(hf, "pretraining_tp", (1,), 1)
        theta, scaling = rope_from_hf(hf)
        heads = hf["num_attention_heads"]
        dtype = _dtype(hf)
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            d_ff=hf["intermediate_size"],
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=dtype,
            param_dtype=dtype,
            **self.extra_from_hf(hf),
        )

    def extra_from_hf(self, hf: dict) -> dict:
        """ModelConfig fields that only this family sets."""
        return {}

    def fit_tensors(self, cfg: ModelConfig, names) -> ModelConfig:
        """The config as the checkpoint's tensor `names` have it (config.json may announce parts that a
        checkpoint leaves out)."""
        return cfg

    # -- ModelConfig -> config.json ------------------------------------------------------------------------------
    def unsupported(self, cfg: ModelConfig) -> str | None:
        """Why this family cannot represent `cfg` (None: it can)."""
        checks = [
            *self.kind_checks(cfg),
            (cfg.attn_logit_softcap == 0, f"model.attn_logit_softcap={cfg.attn_logit_softcap}"),
            (cfg.final_logit_softcap == 0, f"model.final_logit_softcap={cfg.final_logit_softcap}"),
            (cfg.width_mult == 1.0, f"model.parametrization={cfg.parametrization!r} (logits divided by the width)"),
            (
                cfg.mtp.num_heads == 0 or "mtp.style" in self.kinds,
                f"model.mtp.num_heads={cfg.mtp.num_heads} (only DeepSeek-V3 stores MTP layers)",
            ),
            *self.own_checks(cfg),
        ]
        return next((what for ok, what in checks if not ok), None)

    def kind_checks(self, cfg: ModelConfig) -> list[tuple[bool, str]]:
        """Each kind `cfg` builds is one of `kinds`."""
        checks = []
        for key, allowed in self.kinds.items():
            built = key not in _BUILT_WHEN or _BUILT_WHEN[key](cfg)
            note = f" ({self.kind_notes[key]})" if key in self.kind_notes else ""
            checks.append((not built or cfg.choice(key) in allowed, f"model.{key}={cfg.choice(key)!r}{note}"))
        return checks

    def own_checks(self, cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            (not cfg.qk_norm, "model.qk_norm=True"),
            (cfg.sliding_window == 0, f"model.sliding_window={cfg.sliding_window}"),
        ]

    def to_hf(self, cfg: ModelConfig) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.resolved_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": cfg.param_dtype,
            **rope_to_hf(cfg),
            **self.extra_to_hf(cfg),
        }

    def extra_to_hf(self, cfg: ModelConfig) -> dict:
        return {}

    # -- tensors -------------------------------------------------------------------------------------------------
    def entries(self, cfg: ModelConfig) -> dict[tuple[str, ...], Entry]:
        """Every variable of the unrolled model (its collection, then layer_i paths) and where the checkpoint
        keeps it."""
        out = {
            ("params", "embed", "embedding"): stored("model.embed_tokens.weight"),
            ("params", "final_norm", "scale"): stored("model.norm.weight"),
        }
        if not cfg.tie_embeddings:
            out[("params", "head", "kernel")] = linear("lm_head.weight")
        for i, spec in enumerate(cfg.layer_specs()):
            for (collection, *path), e in self.layer_entries(cfg, i, spec).items():
                out[(collection, f"layer_{i}", *path)] = e
        return out

    def copies(self, cfg: ModelConfig) -> list[tuple[tuple[str, ...], Entry]]:
        """Further places the checkpoint keeps one of our variables ((its path as in `entries`, entry)): written
        on save, not read on load (ours is the one tensor `entries` names)."""
        return []

    def ignored(self, cfg: ModelConfig, name: str) -> bool:
        """Tensors a checkpoint may hold that we do not read (a tied head's copy, RoPE's cached frequencies,
        `copies`)."""
        if any(name in e.names for _, e in self.copies(cfg)):
            return True
        return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")

    def layer_entries(self, cfg: ModelConfig, i: int, spec: LayerSpec) -> dict[tuple[str, ...], Entry]:
        """Layer i's variables, as (collection, *path within the layer)."""
        p = f"model.layers.{i}."
        out = {
            ("params", "attn_norm", "scale"): stored(p + "input_layernorm.weight"),
            ("params", "mlp_norm", "scale"): stored(p + "post_attention_layernorm.weight"),
        }
        out |= {("params", "attn", *k): e for k, e in self.attention_entries(cfg, p + "self_attn.").items()}
        if spec.mlp not in self.mlps:
            raise HFError(f"{self.architecture}: model.mlp={spec.mlp!r}")
        for (collection, *k), e in self.mlps[spec.mlp](cfg, p).items():
            out[(collection, "mlp", *k)] = e
        return out

    def attention_entries(self, cfg: ModelConfig, p: str) -> dict[tuple[str, ...], Entry]:
        out = {
            ("query", "kernel"): linear(p + "q_proj.weight"),
            ("key", "kernel"): linear(p + "k_proj.weight"),
            ("value", "kernel"): linear(p + "v_proj.weight"),
            ("out", "kernel"): linear(p + "o_proj.weight", num_in=2),
        }
        if cfg.qk_norm:
            out |= {("q_norm", "scale"): stored(p + "q_norm.weight"), ("k_norm", "scale"): stored(p + "k_norm.weight")}
        return out


@dataclasses.dataclass(frozen=True)
class Qwen3(Family):
    """Llama plus per-head RMSNorm of queries and keys (before RoPE), and a head_dim of its own."""

    architecture: str = "Qwen3ForCausalLM"
    model_type: str = "qwen3"

    def extra_from_hf(self, hf: dict) -> dict:
        _require(hf, "use_sliding_window", (False,), False)
        return {"qk_norm": True}

    def own_checks(self, cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            (cfg.qk_norm, "model.qk_norm=False"),
            (cfg.sliding_window == 0, f"model.sliding_window={cfg.sliding_window}"),
        ]

    def extra_to_hf(self, cfg: ModelConfig) -> dict:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}


@dataclasses.dataclass(frozen=True)
class Mistral(Family):
    """Llama with a sliding window on every layer (keys within `sliding_window` positions of the query)."""

    architecture: str = "MistralForCausalLM"
    model_type: str = "mistral"

    def extra_from_hf(self, hf: dict) -> dict:
        return {"sliding_window": hf.get("sliding_window") or 0}

    def own_checks(self, cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            (not cfg.qk_norm, "model.qk_norm=True"),
            (cfg.global_every == 0, f"model.global_every={cfg.global_every}"),
        ]

    def extra_to_hf(self, cfg: ModelConfig) -> dict:
        return {"sliding_window": cfg.sliding_window or None}


def mixtral_moe_entries(cfg: ModelConfig, p: str) -> dict[tuple[str, ...], Entry]:
    p, E = p + "block_sparse_moe.", cfg.moe.num_experts
    return {
        ("params", "router"): linear(p + "gate.weight"),
        ("params", "gate"): experts(p + "experts.{e}.w1.weight", E),
        ("params", "up"): experts(p + "experts.{e}.w3.weight", E),
        ("params", "down"): experts(p + "experts.{e}.w2.weight", E),
    }


@dataclasses.dataclass(frozen=True)
class Mixtral(Mistral):
    """Mistral's attention with a sparse MoE MLP in every layer: a softmax router over all experts, the top k
    renormalised (`block_sparse_moe`, experts w1 = gate, w3 = up, w2 = down)."""

    architecture: str = "MixtralForCausalLM"
    model_type: str = "mixtral"
    kinds: ClassVar[dict[str, tuple[str, ...]]] = {**Mistral.kinds, "mlp": ("moe",), "moe.router": ("softmax",)}
    mlps: ClassVar[dict[str, MLPEntries]] = {"moe": mixtral_moe_entries}

    def extra_from_hf(self, hf: dict) -> dict:
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            router="softmax",
            norm_topk_prob=True,
            aux_loss_weight=hf.get("router_aux_loss_coef", 0.01),
            router_noise=hf.get("router_jitter_noise") or 0.0,
        )
        return super().extra_from_hf(hf) | {"mlp": "moe", "moe": moe}

    def own_checks(self, cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            (cfg.moe.norm_topk_prob, "model.moe.norm_topk_prob=False"),
            (cfg.moe.routed_scaling == 1.0, f"model.moe.routed_scaling={cfg.moe.routed_scaling}"),
            (cfg.moe.num_shared_experts == 0, f"model.moe.num_shared_experts={cfg.moe.num_shared_experts}"),
            (cfg.moe.first_dense_layers == 0, f"model.moe.first_dense_layers={cfg.moe.first_dense_layers}"),
            (cfg.moe.every == 1, f"model.moe.every={cfg.moe.every}"),
            *super().own_checks(cfg),
        ]

    def extra_to_hf(self, cfg: ModelConfig) -> dict:
        m = cfg.moe
        return super().extra_to_hf(cfg) | {
            # Every layer is MoE (checked above), so model.d_ff, the dense MLP's width, is unused: Mixtral's
            # intermediate_size is the experts' width.
            "intermediate_size": m.d_ff_of(cfg),
            "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": m.aux_loss_weight,
            "router_jitter_noise": m.router_noise,
            "output_router_logits": False,
        }


def deepseek_moe_entries(cfg: ModelConfig, p: str) -> dict[tuple[str, ...], Entry]:
    p, E = p + "mlp.", cfg.moe.num_experts
    out = {
        ("params", "router"): linear(p + "gate.weight"),
        ("state", "bias"): stored(p + "gate.e_score_correction_bias"),
        ("params", "gate"): experts(p + "experts.{e}.gate_proj.weight", E),
        ("params", "up"): experts(p + "experts.{e}.up_proj.weight", E),
        ("params", "down"): experts(p + "experts.{e}.down_proj.weight", E),
    }
    if cfg.moe.num_shared_experts:
        out |= swiglu_entries(p + "shared_experts.", ("shared",))
    return out


@dataclasses.dataclass(frozen=True)
class DeepseekV3(Family):
    """Multi-head latent attention (model/mla.py: its weights are DeepSeek's, reshaped), dense SwiGLU layers
    first, then sparse MoE layers: sigmoid scores with group-limited top-k, the correction bias (non-trained
    state, `e_score_correction_bias`), `routed_scaling_factor`, and shared experts; YaRN RoPE.

    Its multi-token prediction layers (`num_nextn_predict_layers` of them, after the last layer: depth d is
    model.layers.{num_layers + d - 1}) are our sequential MTP heads (model/mtp.py): `enorm`, `hnorm`,
    `eh_proj` (on [embedding; hidden]), a decoder layer, `shared_head.norm` -> embed_norm_d, hidden_norm_d,
    proj_d, block_d, head_norm_d. Each layer also keeps copies of the embedding (`embed_tokens`) and of the
    unembedding (`shared_head.head`): ours are shared, so load reads the main ones (not comparing the copies)
    and save writes them. A checkpoint whose config.json announces MTP layers but holds none (transformers'
    save_pretrained drops them) loads without heads."""

    architecture: str = "DeepseekV3ForCausalLM"
    model_type: str = "deepseek_v3"
    kinds: ClassVar[dict[str, tuple[str, ...]]] = {
        **Family.kinds,
        "attention": ("mla",),
        "mlp": ("moe",),
        "moe.router": ("sigmoid",),
        "mtp.style": ("sequential",),
    }
    kind_notes: ClassVar[dict[str, str]] = {"mtp.style": "DeepSeek-V3's MTP layers are sequential"}
    mlps: ClassVar[dict[str, MLPEntries]] = {**Family.mlps, "moe": deepseek_moe_entries}  # its first layers dense

    def from_hf(self, hf: dict) -> ModelConfig:
        _require(hf, "rope_interleave", (True,), True)
        _require(hf, "topk_method", ("noaux_tc",), "noaux_tc")
        _require(hf, "scoring_func", ("sigmoid",), "sigmoid")
        cfg = super().from_hf(hf | {"head_dim": hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]})
        return dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)

    def extra_from_hf(self, hf: dict) -> dict:
        mla = MLAConfig(
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
        )
        moe = MoEConfig(
            num_experts=hf["n_routed_experts"],
            top_k=hf["num_experts_per_tok"],
            d_ff_expert=hf["moe_intermediate_size"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            first_dense_layers=hf.get("first_k_dense_replace", 0),
            every=hf.get("moe_layer_freq", 1),
            router="sigmoid",
            norm_topk_prob=hf.get("norm_topk_prob", True),
            routed_scaling=hf.get("routed_scaling_factor", 1.0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            aux_loss_weight=0.0,
            bias_update_rate=BIAS_UPDATE_RATE,
        )
        mtp = MTPConfig(num_heads=hf.get("num_nextn_predict_layers") or 0, style="sequential")
        return {"attention": "mla", "mla": mla, "mlp": "moe", "moe": moe, "mtp": mtp}

    def fit_tensors(self, cfg: ModelConfig, names) -> ModelConfig:
        if cfg.mtp.num_heads and f"model.layers.{cfg.num_layers}.eh_proj.weight" not in names:
            return dataclasses.replace(cfg, mtp=MTPConfig())
        return cfg

    def own_checks(self, cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            (not cfg.qk_norm, "model.qk_norm=True"),
            (cfg.sliding_window == 0, f"model.sliding_window={cfg.sliding_window}"),
        ]

    def extra_to_hf(self, cfg: ModelConfig) -> dict:
        a, m = cfg.mla, cfg.moe
        return {
            "q_lora_rank": a.q_lora_rank or None,
            "kv_lora_rank": a.kv_lora_rank,
            "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim,
            "qk_head_dim": a.qk_nope_head_dim + a.qk_rope_head_dim,
            "v_head_dim": a.v_head_dim,
            "head_dim": a.qk_rope_head_dim,
            "rope_interleave": True,
            "n_routed_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.d_ff_of(cfg),
            "n_shared_experts": m.num_shared_experts,
            "first_k_dense_replace": m.first_dense_layers,
            "moe_layer_freq": m.every,
            "norm_topk_prob": m.norm_topk_prob,
            "routed_scaling_factor": m.routed_scaling,
            "n_group": m.n_group,
            "topk_group": m.topk_group,
            "num_nextn_predict_layers": cfg.mtp.num_heads,
        }

    def entries(self, cfg: ModelConfig) -> dict[tuple[str, ...], Entry]:
        out = super().entries(cfg)
        for d in range(1, cfg.mtp.num_heads + 1):
            i = cfg.num_layers + d - 1
            p, ours = f"model.layers.{i}.", ("mtp",)
            out |= {
                ("params", *ours, f"embed_norm_{d}", "scale"): stored(p + "enorm.weight"),
                ("params", *ours, f"hidden_norm_{d}", "scale"): stored(p + "hnorm.weight"),
                ("params", *ours, f"proj_{d}", "kernel"): linear(p + "eh_proj.weight"),
                ("params", *ours, f"head_norm_{d}", "scale"): stored(p + "shared_head.norm.weight"),
            }
            for (collection, *path), e in self.layer_entries(cfg, i, mtp_lib.block_spec(cfg)).items():
                out[(collection, *ours, f"block_{d}", *path)] = e
        return out

    def copies(self, cfg: ModelConfig) -> list[tuple[tuple[str, ...], Entry]]:
        """Each MTP layer's embedding and unembedding."""
        embed, head = ("params", "embed", "embedding"), ("params", "head", "kernel")
        out = []
        for d in range(1, cfg.mtp.num_heads + 1):
            p = f"model.layers.{cfg.num_layers + d - 1}."
            out.append((embed, stored(p + "embed_tokens.weight")))
            tied = (embed, stored(p + "shared_head.head.weight"))
            out.append(tied if cfg.tie_embeddings else (head, linear(p + "shared_head.head.weight")))
        return out

    def attention_entries(self, cfg: ModelConfig, p: str) -> dict[tuple[str, ...], Entry]:
        out = {
            ("kv_down", "kernel"): linear(p + "kv_a_proj_with_mqa.weight"),
            ("kv_norm", "scale"): stored(p + "kv_a_layernorm.weight"),
            ("kv_up", "kernel"): linear(p + "kv_b_proj.weight"),
            ("out", "kernel"): linear(p + "o_proj.weight", num_in=2),
        }
        if cfg.mla.q_lora_rank:
            return out | {
                ("q_down", "kernel"): linear(p + "q_a_proj.weight"),
                ("q_norm", "scale"): stored(p + "q_a_layernorm.weight"),
                ("q_up", "kernel"): linear(p + "q_b_proj.weight"),
            }
        return out | {("query", "kernel"): linear(p + "q_proj.weight")}

    def ignored(self, cfg: ModelConfig, name: str) -> bool:
        """Also, for a model loaded without MTP heads, the multi-token prediction layer after the last
        (model.layers.{num_layers}...), which transformers does not run either."""
        mtp_layer = cfg.mtp.num_heads == 0 and name.startswith(f"model.layers.{cfg.num_layers}.")
        return super().ignored(cfg, name) or mtp_layer


# DeepSeek-V3's bias update speed (gamma, section 2.1.2 of the report) for runs that continue training.
BIAS_UPDATE_RATE = 0.001

FAMILIES: dict[str, Family] = {f.architecture: f for f in (Family(), Qwen3(), Mistral(), Mixtral(), DeepseekV3())}
# Export: the most specific family that fits first (a plain Llama-shaped config is also a valid Mistral one).
EXPORT_ORDER: tuple[str, ...] = (
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV3ForCausalLM",
)
