"""Quantization schemes on one matrix: `quantize(w_KN, scheme, group) -> Quantized` and `dequantize(q) -> w_KN`.

A weight is quantized as a matrix [..., K, N] (K: the input channels a matmul contracts, N: the outputs; leading
axes are independent matrices: experts, stacked layers). Each output column is split into groups of `group` input
channels (`group=0`: one group per column, "per output channel") and every group gets its own scale (and zero
point). The schemes, with q the stored code and s, z its group's scale and zero point:

- `int8`: ggml's q8_0 rule: s = absmax / 127, q = round(w / s) in [-127, 127], w ~ q * s.
  (Every `round` here is C's roundf, ties away from zero, as in ggml.)
- `int4`: ggml's q4_0 rule: m = the group's value of largest magnitude (with its sign), s = m / -8,
  q = clip(floor(w / s + 0.5), -8, 7), w ~ q * s. Symmetric (no zero point); the sign of s puts m on code -8, so
  all 16 codes are used.
- `int8-zp`, `int4-zp`: affine, `x_q = round(x / S + Z)` with S = (max - min) / (2^b - 1) over a range that
  contains 0 and Z = round(-min / S), codes in [0, 2^b - 1], w ~ (q - z) * s.
- `nf4`: QLoRA's 4-bit NormalFloat: s = absmax, q = the index of the NF4 level nearest w / s, w ~ NF4[q] * s;
  with double quantization of the scales (`double_quantize`): the float32 absmax constants, less their mean,
  are stored as 8-bit floats (float8_e4m3fn) with one float32 scale per 256 of them, as the QLoRA paper does.

Scales are rounded to float16 before the codes are computed from them (ggml's blocks store an f16 scale), so a
group-32 `int8`/`int4` weight is exactly what llama.cpp's q8_0/q4_0 store: `model.gguf` exports it losslessly,
and quantizing its dequantized values again gives the same codes. int4 codes are packed two to a byte along K
(row 2i in the low nibble, row 2i+1 in the high one).

qwix (the JAX quantization library) was evaluated first: its arrays round with bounds extended by half a step
(an int8 group's absmax maps to 127.5, int4's to 7.5), which no ggml block type reproduces, and it keeps int4 as
one byte per value on CPU. The formulas here are a few lines each; the NF4 levels are the published table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4", "int8-zp", "int4-zp", "nf4")
GROUPS = (0, 32, 64, 128)  # 0: per output channel
DEFAULT_GROUP = {"int8": 0, "int4": 32, "int8-zp": 0, "int4-zp": 32, "nf4": 64}
BITS = {"int8": 8, "int4": 4, "int8-zp": 8, "int4-zp": 4, "nf4": 4}
DOUBLE_QUANT_BLOCK = 256  # QLoRA's second-level block of scales

# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' table): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


class QuantError(ValueError):
    """A scheme, group size or weight that cannot be quantized as asked."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to quantize a model: `scheme` (SCHEMES), `group` (GROUPS; None: the scheme's default) and `skip`,
    glob patterns of the '/'-joined parameter paths to keep in float (a pattern also matches any path containing
    it: 'embed' keeps the embedding, 'head' the untied head)."""

    scheme: str
    group: int | None = None
    skip: tuple[str, ...] = ("router",)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QuantError(f"quant scheme {self.scheme!r}: one of {', '.join(SCHEMES)}")
        if self.group is not None and self.group not in GROUPS:
            raise QuantError(f"quant group {self.group}: one of {', '.join(map(str, GROUPS))} (0: per channel)")

    @property
    def group_size(self) -> int:
        return DEFAULT_GROUP[self.scheme] if self.group is None else self.group

    @property
    def tag(self) -> str:
        """The scheme as a parameter name suffix ("kernel_int4zp")."""
        return self.scheme.replace("-", "")


def group_of(K: int, group: int) -> int:
    """The group size used for K input channels (0: all of them); QuantError if it does not divide K."""
    if group == 0:
        return K
    if K % group:
        raise QuantError(f"quant group {group} does not divide a weight's {K} input channels (use 0: per channel)")
    return group


@jax.custom_jvp
def round_f16(x: jax.Array) -> jax.Array:
    """x rounded to float16 (as ggml stores a block's scale), in float32; its derivative is taken as 1 (learned
    clipping's straight-through scale: a cast's own derivative would round the cotangent to float16 too)."""
    return x.astype(jnp.float16).astype(jnp.float32)


@round_f16.defjvp
def _round_f16_jvp(primals, tangents):
    return round_f16(primals[0]), tangents[0]


def round_half_away(x: jax.Array) -> jax.Array:
    """C's roundf (ties away from zero), as ggml's quantizers round."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _safe_inverse(s: jax.Array) -> jax.Array:
    return jnp.where(s == 0, 0.0, 1.0 / jnp.where(s == 0, 1.0, s))


def codes_and_scales(
    w_KN: jax.Array, scheme: str, group: int, clip_GN: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(codes [..., K, N] int8 (uint8 for -zp and nf4), scales [..., K/G, N] float32 (f16-rounded), zero points
    [..., K/G, N] uint8 or None), with every group's scale computed from the weight itself (round to nearest), its
    range first multiplied by `clip_GN` where given (learned clipping: `fake_quantize_clipped`)."""
    s, z = scales_and_zeros(w_KN, scheme, group, clip_GN)
    return codes_with(w_KN, scheme, s, z), s, None if z is None else z.astype(jnp.uint8)


def scales_and_zeros(
    w_KN: jax.Array, scheme: str, group: int, clip_GN: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """Every group's scale [..., K/G, N] (float32; f16-rounded but for nf4's absmax) and zero point (float32
    integers, -zp schemes; else None) by the scheme's rule, with the group's range (absmax, signed max, or
    [min, max]) multiplied by `clip_GN` first where given: differentiable in `clip_GN` (through the f16 rounding
    as if it were not there), constant in `w_KN`."""
    *lead, K, N = w_KN.shape
    G = group_of(K, group)
    w = jax.lax.stop_gradient(w_KN).astype(jnp.float32).reshape(*lead, K // G, G, N)
    a = 1.0 if clip_GN is None else clip_GN[..., None, :]
    times = (lambda x: x) if clip_GN is None else (lambda x: x * a)  # RTN's scales bit for bit without a clip
    if scheme == "int8":
        return round_f16(times(jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127))[..., 0, :], None
    if scheme == "int4":
        i = jnp.argmax(jnp.abs(w), axis=-2, keepdims=True)
        return round_f16(times(jnp.take_along_axis(w, i, axis=-2) / -8))[..., 0, :], None
    if scheme in ("int8-zp", "int4-zp"):
        top = 2 ** BITS[scheme] - 1
        lo = times(jnp.minimum(jnp.min(w, axis=-2, keepdims=True), 0.0))
        hi = times(jnp.maximum(jnp.max(w, axis=-2, keepdims=True), 0.0))
        s = round_f16((hi - lo) / top)
        z = jnp.clip(round_half_away(jax.lax.stop_gradient(-lo * _safe_inverse(s))), 0, top)
        return s[..., 0, :], z[..., 0, :]
    if scheme == "nf4":  # a positive scale (the levels are symmetric; the double quantization keeps it >= 0)
        absmax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
        return (absmax if clip_GN is None else absmax * jnp.abs(a))[..., 0, :], None
    raise QuantError(f"quant scheme {scheme!r}: one of {', '.join(SCHEMES)}")


def codes_with(w_KN: jax.Array, scheme: str, s_GN: jax.Array, z_GN: jax.Array | None = None) -> jax.Array:
    """The codes of `w_KN` under given scales (and zero points) [..., K/G, N]: round to nearest, clipped."""
    *lead, K, N = w_KN.shape
    G = K // s_GN.shape[-2]
    w = w_KN.astype(jnp.float32).reshape(*lead, K // G, G, N)
    inv = _safe_inverse(s_GN)[..., None, :]
    if scheme == "int8":
        q = jnp.clip(round_half_away(w * inv), -127, 127).astype(jnp.int8)
    elif scheme == "int4":
        q = jnp.clip(jnp.floor(w * inv + 0.5), -8, 7).astype(jnp.int8)
    elif scheme in ("int8-zp", "int4-zp"):
        top = 2 ** BITS[scheme] - 1
        q = jnp.clip(round_half_away(w * inv + z_GN[..., None, :]), 0, top).astype(jnp.uint8)
    elif scheme == "nf4":
        q = jnp.argmin(jnp.abs((w * inv)[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
    else:
        raise QuantError(f"quant scheme {scheme!r}: one of {', '.join(SCHEMES)}")
    return q.reshape(*lead, K, N)


def values_of(q_KN: jax.Array, scheme: str, s_GN: jax.Array, z_GN: jax.Array | None = None) -> jax.Array:
    """float32 [..., K, N] the codes stand for (unpacked codes)."""
    *lead, K, N = q_KN.shape
    G = K // s_GN.shape[-2]
    q = q_KN.reshape(*lead, K // G, G, N)
    if scheme == "nf4":
        x = jnp.asarray(NF4_LEVELS)[q.astype(jnp.int32)]
    elif z_GN is not None:
        x = q.astype(jnp.float32) - z_GN[..., None, :].astype(jnp.float32)
    else:
        x = q.astype(jnp.float32)
    return (x * s_GN[..., None, :].astype(jnp.float32)).reshape(*lead, K, N)


def pack4(q_KN: jax.Array) -> jax.Array:
    """4-bit codes [..., K, N] (int8 in [-8, 7] or uint8 in [0, 15]) -> uint8 [..., K/2, N], two per byte."""
    if q_KN.shape[-2] % 2:
        raise QuantError(f"int4 packs two input channels per byte: {q_KN.shape[-2]} is odd")
    nib = q_KN.astype(jnp.uint8) & 0xF
    return nib[..., 0::2, :] | (nib[..., 1::2, :] << 4)


def unpack4(p_KN: jax.Array, signed: bool) -> jax.Array:
    """uint8 [..., K/2, N] -> codes [..., K, N] (int8 sign-extended if `signed`, else uint8)."""
    lo, hi = p_KN & 0xF, p_KN >> 4
    q = jnp.stack([lo, hi], axis=-2).reshape(*p_KN.shape[:-2], 2 * p_KN.shape[-2], p_KN.shape[-1])
    if signed:
        return (q.astype(jnp.int8) ^ 8) - 8  # sign-extend the nibble
    return q


def double_quantize(s_GN: jax.Array) -> dict:
    """QLoRA's second quantization of NF4's absmax constants: (s - mean) as float8_e4m3fn with one float32 scale
    per DOUBLE_QUANT_BLOCK constants (of the flattened scales; the last block may be short)."""
    flat = s_GN.astype(jnp.float32).reshape(-1)
    mean = jnp.mean(flat)
    c = flat - mean
    n = flat.shape[0]
    blocks = -(-n // DOUBLE_QUANT_BLOCK)
    padded = jnp.pad(c, (0, blocks * DOUBLE_QUANT_BLOCK - n)).reshape(blocks, DOUBLE_QUANT_BLOCK)
    s2 = jnp.max(jnp.abs(padded), axis=-1, keepdims=True) / float(jnp.finfo(jnp.float8_e4m3fn).max)
    c8 = (padded * _safe_inverse(s2)).astype(jnp.float8_e4m3fn)
    return {"scale": c8.reshape(-1)[:n].reshape(s_GN.shape), "scale2": s2[:, 0], "offset": mean}


def double_dequantize(c8_GN: jax.Array, s2: jax.Array, offset: jax.Array) -> jax.Array:
    flat = c8_GN.reshape(-1).astype(jnp.float32)
    per = jnp.repeat(s2, DOUBLE_QUANT_BLOCK)[: flat.shape[0]]
    return jnp.maximum(flat * per + offset, 0.0).reshape(c8_GN.shape)  # an absmax is never negative


def quantize(w_KN: jax.Array, scheme: str, group: int) -> dict:
    """The stored arrays of `w_KN` [..., K, N]: {"q": codes (4-bit schemes packed: [..., K/2, N] uint8),
    "scale": [..., K/G, N] (nf4: float8 + "scale2", "offset"), "zero": uint8 zero points (-zp schemes)}."""
    if w_KN.ndim > 2:  # one matrix at a time (nf4's second-level blocks are per matrix)
        return jax.vmap(lambda w: quantize(w, scheme, group))(w_KN)
    q, s, z = codes_and_scales(w_KN, scheme, group)
    return store(q, s, z, scheme)


def store(q_KN: jax.Array, s_GN: jax.Array, z_GN: jax.Array | None, scheme: str) -> dict:
    """The stored arrays of given codes, scales and zero points (see `quantize`)."""
    out = {"q": pack4(q_KN) if BITS[scheme] == 4 else q_KN}
    if scheme == "nf4":
        out |= double_quantize(s_GN)
    else:
        out["scale"] = s_GN.astype(jnp.float16)
    if z_GN is not None:
        out["zero"] = z_GN
    return out


def scales_of(stored: dict, scheme: str) -> jax.Array:
    if scheme == "nf4":
        return double_dequantize(stored["scale"], stored["scale2"], stored["offset"])
    return stored["scale"].astype(jnp.float32)


def codes_of(stored: dict, scheme: str) -> jax.Array:
    if BITS[scheme] == 4:
        return unpack4(stored["q"], signed=scheme == "int4")
    return stored["q"]


def dequantize(stored: dict, scheme: str) -> jax.Array:
    """float32 [..., K, N] of `quantize`'s arrays."""
    if stored["q"].ndim > 2:
        return jax.vmap(lambda s: dequantize(s, scheme))(stored)
    return values_of(codes_of(stored, scheme), scheme, scales_of(stored, scheme), stored.get("zero"))


def fake_quantize(w_KN: jax.Array, scheme: str, group: int) -> jax.Array:
    """w_KN rounded to what `scheme` stores (quantize then dequantize, with nf4's scales double-quantized), in
    w's dtype, with a straight-through gradient: d(output)/d(w) is the identity."""
    rounded = dequantize(quantize(jax.lax.stop_gradient(w_KN), scheme, group), scheme).astype(w_KN.dtype)
    return rounded + (w_KN - jax.lax.stop_gradient(w_KN))  # exactly `rounded`; the gradient passes straight


def fake_quantize_clipped(w_KN: jax.Array, scheme: str, group: int, clip_GN: jax.Array) -> jax.Array:
    """w_KN rounded to what `quantize_clipped(w_KN, scheme, group, clip_GN)` stores (the values, bit for bit), with
    learned step size quantization's gradients (Esser et al. 2020, LSQ; the clipping factor as OmniQuant's
    learnable weight clipping): d/dw is 1 where w lies inside its group's clipped range and 0 where it is clipped,
    and d/dclip reaches each group's scale through q * s with the rounding passed straight through
    (d(q s)/ds = q - w/s inside the range, q outside it)."""
    if w_KN.ndim > 2:  # one matrix at a time (nf4's second-level blocks are per matrix)
        return jax.vmap(lambda w, c: fake_quantize_clipped(w, scheme, group, c))(w_KN, clip_GN)
    K, N = w_KN.shape
    G = group_of(K, group)
    s, z = scales_and_zeros(w_KN, scheme, group, clip_GN)
    codes = codes_with(jax.lax.stop_gradient(w_KN), scheme, s, z)
    stored = store(codes, jax.lax.stop_gradient(s), None if z is None else z.astype(jnp.uint8), scheme)
    exact = jax.lax.stop_gradient(dequantize(stored, scheme))  # what quantize_clipped stores, dequantized
    w = w_KN.astype(jnp.float32).reshape(K // G, G, N)
    x = w * _safe_inverse(s)[:, None]
    if scheme == "nf4":
        x = jnp.clip(x, -1.0, 1.0)
        level = jnp.asarray(NF4_LEVELS)[jnp.argmin(jnp.abs(x[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)]
        surrogate = _straight(x, level) * s[:, None]
    else:
        zero = 0.0 if z is None else jax.lax.stop_gradient(z)[:, None]
        lo, hi = {"int8": (-127, 127), "int4": (-8, 7)}.get(scheme, (0, 2 ** BITS[scheme] - 1))
        x = jnp.clip(x + zero, lo, hi)
        rounded = jnp.floor(x + 0.5) if scheme == "int4" else round_half_away(x)
        surrogate = (_straight(x, rounded) - zero) * s[:, None]
    surrogate = surrogate.reshape(K, N)
    return (exact + (surrogate - jax.lax.stop_gradient(surrogate))).astype(w_KN.dtype)  # exactly `exact`


def quantize_clipped(w_KN: jax.Array, scheme: str, group: int, clip_GN: jax.Array) -> dict:
    """`quantize`'s arrays with every group's range multiplied by `clip_GN` [..., K/G, N] first (learned
    clipping: what a run trained with `fake_quantize_clipped` deploys as)."""
    if w_KN.ndim > 2:
        return jax.vmap(lambda w, c: quantize_clipped(w, scheme, group, c))(w_KN, clip_GN)
    return store(*codes_and_scales(w_KN, scheme, group, clip_GN), scheme)


def _straight(x: jax.Array, rounded: jax.Array) -> jax.Array:
    """`rounded` forward, the identity's gradient backward."""
    return x + jax.lax.stop_gradient(rounded - x)
