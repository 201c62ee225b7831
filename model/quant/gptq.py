"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Each weight w [K, N] (K input channels, N outputs) is quantized one input channel (row) at a time, in the order of
its Hessian H = sum over calibration rows of x x^T (model/quant/calibrate.py); the rounding error of each row is
spread over the rows not yet quantized through the inverse Hessian (the OBS update), so the output error
||X w - X w_q|| stays small where the inputs are correlated. As the paper's Algorithm 1 and its reference code:

- damping: H + percdamp * mean(diag H) * I (default 0.01); dead channels (diag H = 0: an input never nonzero) get
  H_kk = 1 and a zero weight;
- the inverse Hessian enters through the upper Cholesky factor U of H^-1 (H^-1 = U^T U), whose row k is the
  OBS update of the rows after k once rows before it are fixed;
- lazy batch updates: rows in blocks of `block` (128); each row updates the rest of its block at once, the block's
  errors update the rows after it in one matmul;
- group-wise scales (and zero points) are computed by the scheme's own rule (`schemes.codes_and_scales`) when
  a group starts, from the weights as the errors of earlier rows left them; codes by `schemes.codes_with`, so codes,
  scales and zero points are what `schemes.store` keeps and `schemes.dequantize` reads back. The reference code
  takes a group's scales from the matrix with only the earlier blocks' updates applied (for groups that start
  inside a block); here they see every earlier row's update, as the paper's algorithm (one row at a time) does.
- act-order (`act_order`): rows in order of decreasing diag(H). Scales are then static: computed up front for
  the original contiguous groups (the reference's `static_groups=True`), because the stored format keeps one scale
  per contiguous group of K. nf4's scales are static too: its absmax constants are double-quantized over the whole
  matrix (`schemes.double_quantize`), so the scales the codes are rounded with are known only once all are, and
  are computed and double-quantized before the first row so that the error feedback uses the values stored.

Written in NumPy, float64: the loop over rows is inherently sequential, each step a few vector operations on a
row of N outputs, which NumPy runs with no compile and no dispatch beyond the scheme's rounding (one jitted call
per row); a 10M-parameter model's few thousand rows per layer take seconds on a CPU. float64 keeps the Cholesky
factors of a nearly singular H (a few hundred calibration windows, a wide down-projection) well behaved.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.quant import schemes
from model.quant.calibrate import Stats
from model.quant.params import Quantizer, WeightInfo, rtn
from model.quant.schemes import Spec

BLOCK = 128
PERCDAMP = 0.01


@functools.partial(jax.jit, static_argnames="scheme")
def _round_row(w_1N, s_1N, z_1N, scheme: str):
    """(codes, the values they stand for) of one row under its group's scale (and zero point)."""
    q = schemes.codes_with(w_1N, scheme, s_1N, z_1N)
    return q, schemes.values_of(q, scheme, s_1N, z_1N)


@functools.partial(jax.jit, static_argnames=("scheme", "group"))
def _scales(w_KN, scheme: str, group: int):
    """(scales [K/G, N] as stored, zero points or None) of `w_KN` by the scheme's rule; nf4's double-quantized."""
    _, s, z = schemes.codes_and_scales(w_KN, scheme, group)
    return s, z


def stored_scales(s_GN: np.ndarray, scheme: str) -> np.ndarray:
    """The scales `schemes.store` keeps for `s_GN`, as `schemes.dequantize` reads them back."""
    if scheme == "nf4":
        return np.asarray(schemes.double_dequantize(*schemes.double_quantize(jnp.asarray(s_GN)).values()))
    return np.asarray(s_GN)


def inverse_hessian_factor(H_KK: np.ndarray, percdamp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1, H^-1 = U^T U (float64)."""
    H = H_KK + percdamp * np.mean(np.diag(H_KK)) * np.eye(len(H_KK))
    L = np.linalg.cholesky(H)
    L_inv = np.linalg.solve(L, np.eye(len(H)))  # H^-1 = L^-T L^-1
    return np.linalg.cholesky(L_inv.T @ L_inv).T


def gptq_matrix(
    w_KN: np.ndarray,
    H_KK: np.ndarray,
    scheme: str,
    group: int,
    *,
    percdamp: float = PERCDAMP,
    block: int = BLOCK,
    act_order: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes [K, N], scales [K/G, N] (f16-rounded; nf4: absmax before double quantization), zero points or None)
    of `w_KN` quantized by GPTQ with Hessian `H_KK`: what `schemes.store` takes."""
    K, N = w_KN.shape
    G = schemes.group_of(K, group)
    if G != K and block % G:
        raise schemes.QuantError(f"GPTQ block {block} must be a whole number of groups of {G}")
    W = np.array(w_KN, np.float64)
    H = np.array(H_KK, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    static = act_order or scheme == "nf4"
    s_GN = z_GN = None
    if static:  # every group's scale from the weight before any update, kept as stored
        s, z = _scales(jnp.asarray(W, jnp.float32), scheme, group)
        s_GN, z_GN = np.asarray(s), None if z is None else np.asarray(z)
    s_used = None if s_GN is None else stored_scales(s_GN, scheme)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    W, H = W[order], H[np.ix_(order, order)]
    U = inverse_hessian_factor(H, percdamp)
    if not static:
        s_GN = np.zeros((K // G, N), np.float32)
        z_GN = None if "-zp" not in scheme else np.zeros((K // G, N), np.uint8)

    Q = np.zeros((K, N), np.int32)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Err1 = W[i1:i2].copy(), np.zeros((i2 - i1, N))
        for i in range(i2 - i1):
            k = order[i1 + i]  # the original row
            g = k // G
            if not static and k % G == 0:  # a group starts: its scale from the rows as updated so far
                rows = W1[i : i + G] if G != K else W  # a whole-column group starts at row 0, before any update
                s, z = _scales(jnp.asarray(rows, jnp.float32), scheme, 0)
                s_GN[g] = np.asarray(s)[0]
                if z is not None:
                    z_GN[g] = np.asarray(z)[0]
            s_row = s_GN[g] if s_used is None else s_used[g]
            z_row = None if z_GN is None else jnp.asarray(z_GN[g][None])
            q, w_q = _round_row(jnp.asarray(W1[i][None], jnp.float32), jnp.asarray(s_row[None]), z_row, scheme)
            Q[i1 + i] = np.asarray(q)[0]
            err = (W1[i] - np.asarray(w_q, np.float64)[0]) / U[i1 + i, i1 + i]
            W1[i:] -= np.outer(U[i1 + i, i1 + i : i2], err)
            Err1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ Err1
    codes = np.empty_like(Q)
    codes[order] = Q
    dtype = np.int8 if scheme in ("int8", "int4") else np.uint8
    return codes.astype(dtype), s_GN, z_GN


def gptq(
    spec: Spec,
    stats: dict[tuple[str, ...], Stats],
    *,
    act_order: bool = False,
    percdamp: float = PERCDAMP,
    block: int = BLOCK,
) -> Quantizer:
    """A Quantizer (model/quant/params.py) running GPTQ on every matrix of a weight with its statistics
    (`calibrate.statistics`: Hessians of the same leading axes as the weight's matrix [..., K, N]); weights with
    none (an untied embedding, training-only heads) are rounded to nearest."""
    nearest = rtn(spec)

    def quantize(info: WeightInfo, w_KN: jax.Array) -> dict:
        if info.path not in stats:
            return nearest(info, w_KN)
        H = stats[info.path].xx
        lead = w_KN.shape[:-2]
        w = np.asarray(w_KN, np.float32)
        out = []
        for index in np.ndindex(*lead):
            q, s, z = gptq_matrix(
                w[index], H[index], spec.scheme, spec.group_size, percdamp=percdamp, block=block, act_order=act_order
            )
            out.append(
                schemes.store(jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z), spec.scheme)
            )
        return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), *out)

    return quantize
