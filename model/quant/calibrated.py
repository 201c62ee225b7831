"""Post-training quantization by method: `quantize(cfg, params, spec, method, windows_NT) -> params`, method one of
METHODS: round to nearest (`rtn`, no calibration), GPTQ (`gptq`, model/quant/gptq.py) or AWQ (`awq`,
model/quant/awq.py), the last two calibrated on token windows (`data.calibration_windows`).

GPTQ runs layer by layer, as the paper does (`sequential`): the Hessians of layer l's weights come from a forward
pass in which every earlier layer is already quantized, so each layer corrects the error the ones before it left
in its inputs. Within a layer every weight sees the layer's float inputs (the reference code's default, without
its `true_sequential` option). The weights outside the layers (the tied embedding as output head, an untied head)
come last, from the fully quantized trunk. Each step is a whole forward pass over the windows (one compiled
program, a layer's worth of weights replaced by their quantized values each time): L + 1 passes for L layers,
cheap next to the GPTQ solves on a model this size, and the model's own code decides what each weight sees.
AWQ calibrates once on the float model: folding its scales leaves the float function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.quant import awq, gptq, schemes
from model.quant.calibrate import statistics
from model.quant.params import (
    Quantizer,
    _get,
    _params_of,
    _replace,
    check,
    layer_params,
    quantize_params,
    skipped,
    weight_infos,
)
from model.quant.schemes import QuantError, Spec

METHODS = ("rtn", "gptq", "awq")
Path = tuple[str, ...]


def quantize(
    cfg: ModelConfig,
    params: dict,
    spec: Spec,
    method: str,
    windows_NT: np.ndarray | None = None,
    act_order: bool = False,
) -> dict:
    """`params` (or {"params", "state"}) quantized as `spec` says by `method`, calibrated on token windows
    [N, T] (T <= cfg.max_seq_len; unused by rtn); `act_order`: GPTQ quantizes columns by decreasing Hessian
    diagonal (static groups)."""
    check(cfg, spec)
    if method == "rtn":
        return quantize_params(cfg, params, spec)
    if method not in METHODS:
        raise QuantError(f"quant method {method!r}: one of {', '.join(METHODS)}")
    if windows_NT is None or len(windows_NT) == 0:
        raise QuantError(f"quant method {method}: needs calibration windows")
    if method == "gptq":
        return sequential(cfg, params, spec, windows_NT, lambda stats: gptq.gptq(spec, stats, act_order=act_order))
    return awq.awq_quantize_params(cfg, params, spec, statistics(cfg, params, windows_NT))


def stages(cfg: ModelConfig) -> list[list[tuple[Path, tuple[int, ...]]]]:
    """The weights in the order a forward pass reaches them, grouped by layer: each stage the (weight path, index
    into its leading axes) of one layer's weights, and a last stage with every weight outside the layers."""
    infos = weight_infos(cfg)
    out, claimed = [], set()
    for _spec, prefix, index in layer_params(cfg):
        stage = [(path, index) for path in infos if path[: len(prefix)] == prefix]
        claimed |= {path for path, _ in stage}
        out.append(stage)
    return out + [[(path, ()) for path in infos if path not in claimed]]


def sequential(
    cfg: ModelConfig, params: dict, spec: Spec, windows_NT: np.ndarray, quantizer_of: Callable[[dict], Quantizer]
) -> dict:
    """`params` quantized stage by stage (`stages`): each stage's weights by `quantizer_of(statistics)`, with
    statistics from a forward pass over `windows_NT` of the model whose earlier stages are already quantized."""
    infos = weight_infos(cfg)
    tree, put_back = _params_of(params)
    work = nn.meta.unbox(tree)  # float params, each weight replaced by its quantized values once quantized
    stored: dict[Path, dict[tuple[int, ...], dict]] = {}
    for stage in stages(cfg):
        stage = [(path, index) for path, index in stage if not skipped(path, spec.skip)]
        if not stage:
            continue
        stats = statistics(cfg, put_back(work), windows_NT)
        for path, index in stage:
            info = infos[path]
            w = _get(work, path)
            layout = info.matrix_layout(w.ndim)
            m = jnp.asarray(layout.to_matrix(w))
            one = {path: stats[path][index]} if path in stats else {}
            arrays = quantizer_of(one)(info, m[index])
            stored.setdefault(path, {})[index] = arrays
            w_q = schemes.dequantize(arrays, spec.scheme).astype(m.dtype)
            work = _replace(work, path, {path[-1]: layout.from_matrix(m.at[index].set(w_q), w.shape)})

    def stacked(info, w_KN) -> dict:
        parts = stored[info.path]
        if list(parts) == [()]:
            return parts[()]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *(parts[i] for i in sorted(parts)))

    return quantize_params(cfg, params, spec, stacked)
