"""LoRA adapters as a params tree holds them: which leaves they are, the merged weights W + (alpha / rank) A B, the
frozen base quantized for QLoRA, and adapters imported from a peft checkpoint.

The forward math is model/weights.py's `LoRA` format (every weight `model.lora.targets` names reads its base plus
"{name}_lora_a" and "{name}_lora_b"); `python -m model.lora merge` writes a merged run as a plain workdir.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import weights
from model.config import LoraConfig, ModelConfig
from model.quant.params import dequantize_params, quantize_params, weight_infos
from model.quant.schemes import Spec
from model.transformer import Transformer, init_variables

# train.trainable's pattern for a LoRA run: the adapters, nothing else (training.config adds it).
TRAINABLE = r"_lora_[ab]$"

# QLoRA keeps these in float (the paper keeps embeddings and the output head in 16 bits; the router is tiny).
BASE_QUANT_SKIP = ("embed", "head", "router")


def is_adapter(path) -> bool:
    """Whether a params path (jax key path or tuple of names) ends in an adapter factor."""
    last = path[-1]
    return str(getattr(last, "key", last)).endswith(weights.LORA_SUFFIXES)


def _filter(tree: dict, keep: Callable[[tuple], bool], prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _filter(v, keep, (*prefix, k))
            if sub:
                out[k] = sub
        elif keep((*prefix, k)):
            out[k] = v
    return out


def adapters(params: dict) -> dict:
    """The adapter leaves of a params tree (what a LoRA run trains and its checkpoints store)."""
    return _filter(params, is_adapter)


def base_of(params: dict) -> dict:
    """A params tree without its adapters."""
    return _filter(params, lambda path: not is_adapter(path))


def combine(base: dict, extra: dict) -> dict:
    """`base` with the leaves of `extra` added (or replacing base's)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = combine(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The same model without adapters (what merging gives)."""
    return dataclasses.replace(cfg, lora=LoraConfig())


def base_quant_spec(cfg: ModelConfig) -> Spec:
    return Spec(cfg.lora.base_quant, None, BASE_QUANT_SKIP)


def quantize_base(cfg: ModelConfig, params: dict) -> dict:
    """QLoRA: every weight of the base but the embedding, head and router in `model.lora.base_quant` (NF4 codes with
    double-quantized scales, model/quant), the adapters as they are; unchanged without base_quant."""
    if not cfg.lora.base_quant:
        return params
    return quantize_params(cfg, params, base_quant_spec(cfg))


def set_entries(tree: dict, path: tuple, entries: dict, drop: tuple = ()) -> dict:
    if len(path) == 0:
        return {**{k: v for k, v in tree.items() if k not in drop}, **entries}
    return {**tree, path[0]: set_entries(tree[path[0]], path[1:], entries, drop)}


def merge(cfg: ModelConfig, params: dict, dtype=None) -> dict:
    """The float params of `base_config(cfg)`: each adapted weight W (dequantized from NF4 under QLoRA) replaced by
    W + (alpha / rank) A B, in `dtype` (default: the params'), adapters dropped. `params`: a params tree, or the
    variables {"params", "state"}."""
    variables = params if "params" in params and isinstance(params["params"], dict) else None
    tree = nn.unbox(variables["params"] if variables is not None else params)
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    tree = dequantize_params(cfg, tree, dtype)
    for info in weight_infos(cfg).values():
        *parent_path, name = info.path
        parent = tree
        for k in parent_path:
            parent = parent[k]
        if f"{name}_lora_a" not in parent:
            continue
        w = parent[name]
        a, b = parent[f"{name}_lora_a"], parent[f"{name}_lora_b"]
        delta = weights.lora_delta(a, b, info.matrix_layout(w.ndim), w.shape)
        merged = (w.astype(jnp.float32) + cfg.lora.scale * delta).astype(dtype)
        tree = set_entries(tree, tuple(parent_path), {name: merged}, drop=(f"{name}_lora_a", f"{name}_lora_b"))
    return {**variables, "params": tree} if variables is not None else tree


# peft's names of a Hugging Face weight's adapter factors ("model.layers.0.self_attn.q_proj.weight" ->
# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").
def attach(cfg: ModelConfig, base: dict, rng: jax.Array) -> dict:
    """`base` (a model's params without adapters, e.g. another run's or a Hugging Face model's) with fresh adapters
    (A random, B = 0) on the weights `cfg.lora.targets` names; `base`'s own leaves are kept as given."""
    fresh = jax.jit(lambda key: nn.unbox(init_variables(Transformer(cfg), key))["params"])(rng)
    return combine(nn.unbox(base), adapters(fresh))
