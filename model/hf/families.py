"""The Hugging Face architectures we read and write, one `Family` each: how its config.json maps onto a
ModelConfig (both ways) and where each of our parameters is stored in its checkpoints.

A family is one entry of `FAMILIES` (by `architectures[0]` of config.json); exporting picks the first family
in `EXPORT_ORDER` that can represent the config. Everything a family cannot represent is an `HFError` naming
the key, in either direction.
"""

from __future__ import annotations

import dataclasses

from model.config import LayerSpec, ModelConfig
from model.hf.tensors import Entry, linear, stored
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


@dataclasses.dataclass(frozen=True)
class Family:
    """Llama's layout, which the other dense families extend: GQA attention with RoPE (half-split pairs, as
    ours), RMSNorm before attention and MLP, a SwiGLU MLP, optionally tied embeddings."""

    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"

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

    # -- ModelConfig -> config.json ------------------------------------------------------------------------------
    def unsupported(self, cfg: ModelConfig) -> str | None:
        """Why this family cannot represent `cfg` (None: it can)."""
        checks = [
            (cfg.attention == "gqa", f"model.attention={cfg.attention!r}"),
            (cfg.mlp == "swiglu", f"model.mlp={cfg.mlp!r}"),
            (cfg.norm == "rmsnorm", f"model.norm={cfg.norm!r}"),
            (cfg.position == "rope", f"model.position={cfg.position!r}"),
            (cfg.attn_logit_softcap == 0, f"model.attn_logit_softcap={cfg.attn_logit_softcap}"),
            (cfg.final_logit_softcap == 0, f"model.final_logit_softcap={cfg.final_logit_softcap}"),
            (cfg.width_mult == 1.0, f"model.parametrization={cfg.parametrization!r} (logits divided by the width)"),
            *self.own_checks(cfg),
        ]
        return next((what for ok, what in checks if not ok), None)

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
        """Every parameter of the unrolled model (layer_i paths) and where the checkpoint keeps it."""
        out = {
            ("embed", "embedding"): stored("model.embed_tokens.weight"),
            ("final_norm", "scale"): stored("model.norm.weight"),
        }
        if not cfg.tie_embeddings:
            out[("head", "kernel")] = linear("lm_head.weight")
        for i, spec in enumerate(cfg.layer_specs()):
            layer = f"layer_{i}"
            out |= {(layer, *path): e for path, e in self.layer_entries(cfg, i, spec).items()}
        return out

    def ignored(self, cfg: ModelConfig, name: str) -> bool:
        """Tensors a checkpoint may hold that we do not read (a tied head's copy, RoPE's cached frequencies)."""
        return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")

    def layer_entries(self, cfg: ModelConfig, i: int, spec: LayerSpec) -> dict[tuple[str, ...], Entry]:
        p = f"model.layers.{i}."
        return {
            ("attn_norm", "scale"): stored(p + "input_layernorm.weight"),
            ("mlp_norm", "scale"): stored(p + "post_attention_layernorm.weight"),
            **{("attn", *k): e for k, e in self.attention_entries(cfg, p + "self_attn.").items()},
            **{("mlp", *k): e for k, e in self.mlp_entries(cfg, i, p + "mlp.").items()},
        }

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

    def mlp_entries(self, cfg: ModelConfig, i: int, p: str) -> dict[tuple[str, ...], Entry]:
        return {
            ("gate", "kernel"): linear(p + "gate_proj.weight"),
            ("up", "kernel"): linear(p + "up_proj.weight"),
            ("down", "kernel"): linear(p + "down_proj.weight"),
        }


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


FAMILIES: dict[str, Family] = {f.architecture: f for f in (Family(), Qwen3(), Mistral())}
# Export: the most specific family that fits first (a plain Llama-shaped config is also a valid Mistral one).
EXPORT_ORDER: tuple[str, ...] = ("Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
