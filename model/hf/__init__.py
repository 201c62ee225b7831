"""Hugging Face checkpoints in and out: `cfg, params = load(hf_dir)` and `save(cfg, params, out_dir)`.

`load` reads config.json (either form of its rope keys) and the safetensors files (one, or shards listed by
model.safetensors.index.json), and builds each parameter straight onto its target sharding: every device
shard is cut from the memory-mapped file tensor by tensor, so the model is never held twice in host memory.
No pickle is ever read. `save` writes config.json and safetensors that `transformers` loads. The families and
their tensor names are in `model/hf/families.py`; the command line (import to a workdir, export from one) in
`model/hf/__main__.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from model import lora, weights
from model.config import ModelConfig
from model.hf.families import EXPORT_ORDER, FAMILIES, Family, HFError
from model.hf.tensors import Entry
from model.transformer import Transformer, init_variables, layer_groups, stack_layers, unstack_layers

__all__ = [
    "FAMILIES",
    "HFError",
    "as_variables",
    "check_writable",
    "family_for",
    "hf_tensors",
    "load",
    "read_config",
    "save",
]

INDEX = "model.safetensors.index.json"


def read_config(hf_dir: str | pathlib.Path) -> tuple[Family, dict]:
    """(its family, config.json as a dict)."""
    path = pathlib.Path(hf_dir).expanduser() / "config.json"
    if not path.is_file():
        raise HFError(f"{path}: no such file (a Hugging Face model directory has a config.json)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: not JSON ({e})") from None
    arch = (hf.get("architectures") or [None])[0]
    if arch not in FAMILIES:
        raise HFError(f"{path}: architectures={hf.get('architectures')!r}: one of {', '.join(FAMILIES)}")
    return FAMILIES[arch], hf


def family_for(cfg: ModelConfig) -> Family:
    """The family `save` writes `cfg` as; HFError naming what none of them can represent."""
    reasons = []
    for arch in EXPORT_ORDER:
        why = FAMILIES[arch].unsupported(cfg)
        if why is None:
            return FAMILIES[arch]
        reasons.append(f"{arch}: {why}")
    raise HFError("no Hugging Face architecture represents this model (" + "; ".join(reasons) + ")")


def _files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it."""
    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise HFError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return {name: hf_dir / file for name, file in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HFError(f"{hf_dir}: no *.safetensors files (pickled .bin checkpoints are never read)")
    out = {}
    for file in files:
        with _safe_open(file) as f:
            out |= {name: file for name in f.keys()}
    return out


def _safe_open(file: pathlib.Path):
    """safe_open(file), or HFError naming the file when it is not a whole safetensors file (a truncated download)."""
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise HFError(f"{file}: not a readable safetensors file ({e}); is it truncated? download it again") from None


class _Reader:
    """Tensors by name from memory-mapped safetensors files, opened once each."""

    def __init__(self, files: dict[str, pathlib.Path]):
        self.files, self._open = files, {}

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._open:
            if not file.is_file():
                raise HFError(f"{file}: no such file (listed for tensor {name!r} in {INDEX})")
            self._open[file] = _safe_open(file)
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)


def _stacked_sources(cfg: ModelConfig, abstract: Any) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """Our (possibly scanned) variable path (collection first) -> the unrolled paths of its layers, in the order
    they are stacked."""
    groups = {g.name: g for g in layer_groups(cfg)} if cfg.scan_layers else {}
    out = {}
    for keys, _ in _flat(abstract):
        collection, top, *rest = keys
        g = groups.get(top)
        if g is None:
            out[keys] = [keys]
            continue
        j, rest = (0, rest) if len(g.unit) == 1 else (int(rest[0].removeprefix("block_")), rest[1:])
        out[keys] = [(collection, f"layer_{g.first + r * len(g.unit) + j}", *rest) for r in range(g.repeats)]
    return out


def abstract_variables(cfg: ModelConfig) -> dict:
    """Shapes and dtypes of the model's variables: {"params": ...} and, where a layer keeps non-trained state
    (a router's correction bias), {"state": ...}."""
    boxed = jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0)))
    return {k: v for k, v in nn.unbox(boxed).items() if jax.tree.leaves(v)}


def load(
    hf_dir: str | pathlib.Path,
    *,
    dtype: str | None = None,
    shardings: Callable[[ModelConfig], Any] | None = None,
    **overrides,
) -> tuple[ModelConfig, Any]:
    """(config, params) of a Hugging Face checkpoint directory. For a model with non-trained state (DeepSeek-V3's
    routers' correction biases) `params` is the variables dict {"params": ..., "state": ...}, which
    `model.logits` and `save` take as they take a params tree.

    `dtype` sets the params' and compute dtype (default: config.json's); `overrides` other ModelConfig fields
    (e.g. scan_layers=False). `shardings(config)` gives jax.sharding.Shardings matching {"params": ..., "state":
    ...} (e.g. from a training layout); None: the first device. Each device shard is read from the files by itself.
    """
    hf_dir = pathlib.Path(hf_dir).expanduser()
    family, hf = read_config(hf_dir)
    reader = _Reader(_files(hf_dir))
    try:
        cfg = family.fit_tensors(family.from_hf(hf), reader.files)
    except KeyError as e:
        raise HFError(f"{hf_dir / 'config.json'}: missing key {e.args[0]!r}") from None
    if dtype is not None:
        overrides |= {"dtype": dtype, "param_dtype": dtype}
    cfg = dataclasses.replace(cfg, **overrides)
    entries = family.entries(cfg)
    _check_tensors(family, cfg, entries, reader, hf_dir)

    abstract = abstract_variables(cfg)
    first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = jax.tree.map(lambda _: first, abstract) if shardings is None else shardings(cfg)
    placed = {k: v for k, v in placed.items() if k in abstract}
    sources = _stacked_sources(cfg, abstract)
    scanned = {g.name for g in layer_groups(cfg)} if cfg.scan_layers else set()

    def build(path, leaf, sharding) -> jax.Array:
        keys = tuple(k.key for k in path)
        layers, stacked = sources[keys], keys[1] in scanned
        one_shape = leaf.shape[1:] if stacked else leaf.shape

        def layer(unrolled_path) -> np.ndarray:
            entry = entries[unrolled_path]
            return entry.to_ours([reader.get(n) for n in entry.names], one_shape).astype(leaf.dtype)

        def part(index: tuple[slice, ...]) -> np.ndarray:
            if not stacked:
                return layer(layers[0])[index]
            return np.stack([layer(p)[index[1:]] for p in layers[index[0]]])

        return jax.make_array_from_callback(leaf.shape, sharding, part)

    stored = {k for k, layers in sources.items() if all(p in entries for p in layers)}
    unstored = {k: leaf for k, leaf in _flat(abstract) if k not in stored}
    if any(k[0] != "state" for k in unstored):
        raise AssertionError(f"{family.architecture} stores no tensor for {'/'.join(next(iter(unstored)))}")
    # Non-trained state the family does not store (Mixtral's routers have no correction bias): its initial
    # value (zeros: routing is the plain router's).
    initial = {}
    if unstored:
        state = jax.jit(lambda: nn.unbox(init_variables(Transformer(cfg), jax.random.key(0)))["state"])()
        initial = {("state", *k): v for k, v in _flat(state) if ("state", *k) in unstored}

    def build_or_init(path, leaf, sharding) -> jax.Array:
        keys = tuple(k.key for k in path)
        return build(path, leaf, sharding) if keys in stored else jax.device_put(initial[keys], sharding)

    variables = jax.tree_util.tree_map_with_path(build_or_init, abstract, placed)
    return cfg, variables if "state" in variables else variables["params"]


def as_variables(params: Any) -> dict:
    """{"params": ..., "state": ...} from what `load` returns (a params tree, or already variables)."""
    return dict(params) if "params" in params else {"params": params}


def _flat(tree, is_leaf=None) -> list[tuple[tuple[str, ...], Any]]:
    return [
        (tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    ]


def _check_tensors(family: Family, cfg: ModelConfig, entries: dict, reader: _Reader, hf_dir: pathlib.Path) -> None:
    """Every tensor we need is there with its shape, and nothing else is (before anything is read)."""
    ours = dict(_flat(abstract_variables(dataclasses.replace(cfg, scan_layers=False))))
    wanted = {}
    for path, entry in entries.items():
        if path not in ours:
            raise AssertionError(f"{family.architecture} maps {'/'.join(path)}, which the model does not have")
        for name, shape in zip(entry.names, entry.hf_shapes(ours[path].shape)):
            wanted[name] = shape
    for name, shape in wanted.items():
        if name not in reader.files:
            raise HFError(
                f"{hf_dir}: tensor {name!r} is missing ({family.architecture} with this config.json needs it)"
            )
        got = reader.shape(name)
        if got != shape:
            raise HFError(f"{hf_dir}: tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}")
    for name in reader.files:
        if name not in wanted and not family.ignored(cfg, name):
            raise HFError(
                f"{hf_dir}: unexpected tensor {name!r} (not part of {family.architecture} with this config.json)"
            )


def save(
    cfg: ModelConfig,
    params: Any,
    out_dir: str | pathlib.Path,
    *,
    token_ids: dict[str, int] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Family:
    """Writes config.json and safetensors (sharded, with an index, past `max_shard_bytes`) that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads; returns the family written. `token_ids`
    ({"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}, the tokenizer's) go into config.json and a
    generation_config.json, so generate() stops at the end of a document and pads with a known id."""
    family = family_for(cfg)
    out_dir = pathlib.Path(out_dir).expanduser()
    tensors = hf_tensors(cfg, params, family)
    check_writable(out_dir)
    try:
        _write(family, cfg, tensors, out_dir, max_shard_bytes, token_ids or {})
    except OSError as e:  # e.g. a full disk, or a directory only root's permission bits let through
        raise HFError(f"{out_dir}: cannot write the checkpoint there ({e.strerror or e})") from None
    return family


def hf_tensors(cfg: ModelConfig, params: Any, family: Family | None = None) -> dict[str, np.ndarray]:
    """Every tensor `family`'s checkpoint of `cfg` holds (default: `family_for(cfg)`'s), by its Hugging Face name,
    as host arrays in the params' dtype: what `save` writes, and what a GGUF export (model/gguf) renames."""
    family = family or family_for(cfg)
    variables = as_variables(nn.unbox(params))
    flat = dict(_flat({name: unstack_layers(tree, cfg) for name, tree in variables.items()}))
    entries: dict[tuple[str, ...], Entry] = family.entries(cfg)
    missing = [k for k in entries if k not in flat]
    if missing:
        raise HFError(f"params have no {'/'.join(missing[0])} (not the variables of this config)")
    tensors = {}
    for path, entry in [*entries.items(), *family.copies(cfg)]:
        tensors |= entry.to_hf(_host(flat[path]))
    return tensors


def check_writable(out_dir: str | pathlib.Path) -> None:
    """HFError naming `out_dir` when it cannot be created or written into (checked before anything is read)."""
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise HFError(f"{out_dir}: cannot write there ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HFError(f"{out_dir}: cannot write there ({existing} is read-only)")


def _write(
    family: Family,
    cfg: ModelConfig,
    tensors: dict[str, np.ndarray],
    out_dir: pathlib.Path,
    max_shard_bytes: int,
    token_ids: dict[str, int],
):
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for s, shard in enumerate(shards):
            file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / file, metadata={"format": "pt"})
            weight_map |= {name: file for name in shard}
        total = sum(t.nbytes for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(family.to_hf(cfg) | token_ids, indent=2) + "\n")
    if token_ids:
        (out_dir / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")


def _host(x) -> np.ndarray:
    """A parameter as one host array (gathered from every process when it is sharded across hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def peft_names(hf_name: str) -> tuple[str, str]:
    stem = "base_model.model." + re.sub(r"\.weight$", "", hf_name)
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def from_peft(cfg: ModelConfig, params: dict, tensors: dict[str, Any]) -> dict:
    """`params` (a LoRA model's, e.g. `model.hf.load` of the base with lora set) with the adapters peft saved
    (`adapter_model.safetensors`'s tensors: lora_A [r, in], lora_B [out, r] of each Linear), placed as our A
    [*in, r] and B [r, *out]; adapted weights peft does not hold keep theirs (B = 0: the base). peft's
    lora_alpha and r must be `model.lora`'s (LoRA lives in model/lora; reading peft's names is Hugging Face's side)."""
    family = family_for(lora.base_config(cfg))
    flat = unstack_layers(nn.unbox(params), cfg)
    for (collection, *path), entry in family.entries(lora.base_config(cfg)).items():
        if collection != "params" or not entry.num_in:
            continue
        parent = flat
        for k in path[:-1]:
            parent = parent[k]
        name = path[-1]
        if f"{name}_lora_a" not in parent:
            continue
        pairs = [peft_names(n) for n in entry.names]
        if not all(a in tensors for a, _ in pairs):
            continue
        factors = {}
        for i, suffix in enumerate(weights.LORA_SUFFIXES):
            ours = parent[name + suffix]
            factors[name + suffix] = jnp.asarray(
                entry.to_ours([np.asarray(tensors[p[i]]) for p in pairs], ours.shape), ours.dtype
            )
        flat = lora.set_entries(flat, tuple(path[:-1]), factors)
    return stack_layers(flat, cfg)
