"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A weight's input channels with large activations matter most, so before rounding to nearest each input channel k
of a weight is multiplied by s_k = mean|x_k|^alpha and its input divided by s_k: (x / s)(s w) = x w in float, while
the rounding error of the salient channels shrinks relative to them. alpha is searched on the grid i / 20,
i = 0..19 (llm-awq's `auto_scale` grid), minimising the output error on the calibration activations,

    sum over the weights reading the input of ||X w - (X / s) Q(s w)||^2 = tr(D^T H D),  D = w - Q(s w) / s,

with H = X^T X from calibration (model/quant/calibrate.py), s normalised by sqrt(max s * min s) as the reference
does. (llm-awq measures the error at the output of the whole block the weights feed, e.g. attention's output for
q/k/v; here it is the weights' own outputs, which H gives exactly without keeping activations.)

The 1/s is folded into the op that produces the input, as the reference does, so the stored format is unchanged
and the float model computes the same function (`FOLDS`, per attention and MLP kind):
- a norm's output (its scale, and a LayerNorm's bias): attn_norm for q/k/v (MLA: the query or its down-projection,
  and kv_down), mlp_norm for a dense MLP's gate/up, MLA's q_norm for q_up and kv_norm for kv_up, the final norm
  for an untied head;
- a weight's output columns, where what follows is linear in them: the values for `out` (attention output channel
  (head n, h) is a mix of value channel (n's K/V head, h), so the query heads sharing a K/V head share a scale;
  MLA: kv_up's value columns) and SwiGLU's up for `down` (silu(gate) * up is linear in up).
Weights whose input no foldable op produces are rounded to nearest: MoE experts (mlp_norm also feeds the router
and every expert, which would all have to take one s), a GELU MLP's down (gelu is not linear), a tied embedding
(the table is also the input lookup) and an untied one (a lookup), the extra heads (MTP).

Scales are searched on the float model's statistics, every fold at once (each search reads the original weights;
folds are diagonal scalings of distinct rows and columns, so they commute). llm-awq's second step, the search for
a clipping range per weight, is not done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from model import heads as heads_lib
from model.config import ModelConfig
from model.quant import schemes
from model.quant.calibrate import Stats
from model.quant.params import _get, _params_of, _replace, layer_params, quantize_params, skipped, weight_infos
from model.quant.schemes import Spec

GRID = np.arange(20) / 20

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Fold:
    """Weights `readers` (paths relative to the layer, '/'-joined) read the output of `producer`: a norm module
    (its params divided by s), or with `columns` a weight (its output columns divided by s). `channel_of(cfg)`: the
    producer channel each reader input channel comes from (None: the same one); producer channels no reader
    channel comes from keep scale 1."""

    producer: str
    readers: tuple[str, ...]
    columns: bool = False
    channel_of: Callable[[ModelConfig], np.ndarray] | None = None


def _value_of_output(cfg: ModelConfig) -> np.ndarray:
    """GQA: the value channel (K/V head, h) each attention output channel (head n, h) mixes."""
    N, H, G = cfg.num_heads, cfg.resolved_head_dim, cfg.num_heads // cfg.num_kv_heads
    return ((np.arange(N)[:, None] // G) * H + np.arange(H)).reshape(-1)


def _mla_value_of_output(cfg: ModelConfig) -> np.ndarray:
    """MLA: the kv_up column [head n, P + v] (its value part) each attention output channel (n, v) is a mix of."""
    N, P, V = cfg.num_heads, cfg.mla.qk_nope_head_dim, cfg.mla.v_head_dim
    return (np.arange(N)[:, None] * (P + V) + P + np.arange(V)).reshape(-1)


def _gqa(cfg: ModelConfig) -> tuple[Fold, ...]:
    qkv = ("attn/query/kernel", "attn/key/kernel", "attn/value/kernel")
    return Fold("attn_norm", qkv), Fold("attn/value/kernel", ("attn/out/kernel",), True, _value_of_output)


def _mla(cfg: ModelConfig) -> tuple[Fold, ...]:
    compressed = cfg.mla.q_lora_rank > 0
    query = "attn/q_down/kernel" if compressed else "attn/query/kernel"
    folds = (
        Fold("attn_norm", (query, "attn/kv_down/kernel")),
        Fold("attn/kv_norm", ("attn/kv_up/kernel",)),
        Fold("attn/kv_up/kernel", ("attn/out/kernel",), True, _mla_value_of_output),
    )
    return folds + ((Fold("attn/q_norm", ("attn/q_up/kernel",)),) if compressed else ())


ATTENTION_FOLDS: dict[str, Callable[[ModelConfig], tuple[Fold, ...]]] = {"gqa": _gqa, "mla": _mla}
MLP_FOLDS: dict[str, tuple[Fold, ...]] = {
    "swiglu": (
        Fold("mlp_norm", ("mlp/gate/kernel", "mlp/up/kernel")),
        Fold("mlp/up/kernel", ("mlp/down/kernel",), True),
    ),
    "gelu": (Fold("mlp_norm", ("mlp/up/kernel",)),),
    "moe": (),
}


def folds(cfg: ModelConfig) -> list[tuple[Fold, Path, tuple[int, ...]]]:
    """Every fold of the model: (the fold, the params path its paths are relative to, the index into the leading
    axes there)."""
    out = []
    for spec, prefix, index in layer_params(cfg):
        for fold in (*ATTENTION_FOLDS[spec.attention](cfg), *MLP_FOLDS[spec.mlp]):
            out.append((fold, prefix, index))
    if not cfg.tie_embeddings and not heads_lib.active(cfg):  # the extra heads read the head through norms of theirs
        out.append((Fold("final_norm", ("head/kernel",)), (), ()))
    return out


def _path(prefix: Path, relative: str) -> Path:
    return (*prefix, *relative.split("/"))


def scales(mean_abs_K: np.ndarray, alpha: float, channel_of: np.ndarray | None = None, producer: int = 0):
    """(the producer's scales [producer channels], the readers' input scales [K]): mean|x|^alpha per producer
    channel (averaged over the reader channels it feeds), normalised by sqrt(max * min) as llm-awq does."""
    K = len(mean_abs_K)
    channel_of = np.arange(K) if channel_of is None else channel_of
    producer = producer or K
    fed = np.zeros(producer)
    act = np.zeros(producer)
    np.add.at(fed, channel_of, 1.0)
    np.add.at(act, channel_of, mean_abs_K)
    used = fed > 0
    s = np.ones(producer)
    s[used] = np.maximum((act[used] / fed[used]) ** alpha, 1e-4)
    s[used] /= np.sqrt(s[used].max() * s[used].min())
    return s, s[channel_of]


def output_error(w_KN: np.ndarray, H_KK: np.ndarray, s_K: np.ndarray, spec: Spec) -> float:
    """||X w - (X / s) Q(s w)||^2 = tr(D^T H D), D = w - Q(s w) / s (Q: round to nearest as `spec` stores)."""
    scaled = jnp.asarray(w_KN * s_K[:, None], jnp.float32)
    w_q = np.asarray(schemes.dequantize(schemes.quantize(scaled, spec.scheme, spec.group_size), spec.scheme))
    D = w_KN - w_q.astype(np.float64) / s_K[:, None]
    return float(np.sum(D * (H_KK @ D)))


def search(
    ws_KN: list[np.ndarray], stats: Stats, spec: Spec, channel_of: np.ndarray | None = None, producer: int = 0
) -> tuple[float, np.ndarray, np.ndarray]:
    """(alpha, the producer's scales, the readers' input scales) minimising the summed output error of weights
    `ws_KN` reading one input with statistics `stats` (one matrix's)."""
    best = None
    for alpha in GRID:
        s_prod, s_K = scales(stats.mean_abs, alpha, channel_of, producer)
        err = sum(output_error(np.asarray(w, np.float64), stats.xx, s_K, spec) for w in ws_KN)
        if best is None or err < best[0]:
            best = (err, alpha, s_prod, s_K)
    return best[1], best[2], best[3]


def awq_quantize_params(cfg: ModelConfig, params: dict, spec: Spec, stats: dict[Path, Stats]) -> dict:
    """`params` with AWQ's scales folded in (`fold_scales`) and every weight `spec` does not skip rounded to
    nearest (`quantize_params`)."""
    return quantize_params(cfg, fold_scales(cfg, params, spec, stats), spec)


def fold_scales(cfg: ModelConfig, params: dict, spec: Spec, stats: dict[Path, Stats]) -> dict:
    """Float `params` computing the same function, with each fold's searched scales moved from its producer (norm
    params, or a weight's output columns: divided by s) to its readers (input rows: multiplied by s). Folds whose
    readers `spec` all skips, or that calibration never reached, are left alone."""
    tree, put_back = _params_of(params)
    tree = nn.meta.unbox(tree)
    infos = weight_infos(cfg)
    found = []  # (fold, prefix, index, producer scales, reader input scales)
    for fold, prefix, index in folds(cfg):
        readers = [_path(prefix, r) for r in fold.readers]
        quantized = [p for p in readers if not skipped(p, spec.skip)]
        if not quantized or readers[0] not in stats:
            continue
        matrices = [_matrix(tree, infos[p], index) for p in quantized]
        channel_of = None if fold.channel_of is None else fold.channel_of(cfg)
        producer = _matrix(tree, infos[_path(prefix, fold.producer)], index).shape[1] if fold.columns else 0
        _, s_prod, s_K = search(matrices, stats[readers[0]][index], spec, channel_of, producer)
        found.append((fold, prefix, index, s_prod, s_K))
    for fold, prefix, index, s_prod, s_K in found:
        for r in fold.readers:
            tree = _scale_matrix(tree, infos[_path(prefix, r)], index, s_K[:, None])
        path = _path(prefix, fold.producer)
        if fold.columns:
            tree = _scale_matrix(tree, infos[path], index, 1.0 / s_prod[None, :])
        else:
            norm = {k: _at(v, index, 1.0 / s_prod) for k, v in _get(tree, path).items()}
            tree = _replace(tree, path, {path[-1]: norm})
    return put_back(tree)


def _matrix(tree: dict, info, index: tuple[int, ...]) -> np.ndarray:
    """One matrix [K, N] of weight `info` (index: into its leading axes)."""
    w = np.asarray(_get(tree, info.path), np.float64)
    return np.asarray(info.matrix_layout(w.ndim).to_matrix(w))[index]


def _scale_matrix(tree: dict, info, index: tuple[int, ...], factor: np.ndarray) -> dict:
    """`tree` with one matrix of weight `info` multiplied by `factor` (broadcast over [K, N])."""
    w = _get(tree, info.path)
    layout = info.matrix_layout(w.ndim)
    m = jnp.asarray(layout.to_matrix(w))
    m = m.at[index].set((m[index] * factor).astype(m.dtype))
    return _replace(tree, info.path, {info.path[-1]: layout.from_matrix(m, w.shape)})


def _at(x, index: tuple[int, ...], factor: np.ndarray):
    x = jnp.asarray(x)
    return x.at[index].set((x[index] * factor).astype(x.dtype))
