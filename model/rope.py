"""RoPE scaling for context extension: the inverse frequencies and the attention factor of each scheme,
as Hugging Face transformers' rope utilities compute them (`modeling_rope_utils`).

A scheme is one entry of `ROPE_SCALINGS`: its inverse frequencies, the factor cos/sin are multiplied by
(YaRN's mscale; 1.0 for the others) and its validation rules. Everything here is NumPy on Python scalars,
computed once when the model is built, in float32 as transformers does (`none` gives the frequencies
theta^(-2i/head_dim) of plain RoPE).

- `linear` (position interpolation, Chen et al. 2023): every frequency divided by `factor`.
- `llama3` (Llama 3.1): wavelengths under original_max_len / high_freq_factor kept, over
  original_max_len / low_freq_factor divided by `factor`, a smooth blend in between.
- `yarn` (Peng et al. 2023, and DeepSeek-V2/V3): per dimension, a ramp between the kept frequency
  (dimensions turning more than `beta_fast` times over the original context) and the interpolated one
  (fewer than `beta_slow` times), the ramp's ends rounded outward to whole dimensions (transformers'
  default `truncate=True`); cos/sin scaled by 0.1 ln(factor) + 1, or by
  yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) when both are set (DeepSeek, whose MLA
  also multiplies the softmax scale by `softmax_mscale`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    type: str = "none"  # a key of ROPE_SCALINGS
    factor: float = 1.0  # how many times longer the context gets
    original_max_len: int = 0  # the context the model was pretrained on (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn (DeepSeek)
    mscale_all_dim: float = 0.0  # yarn (DeepSeek; 0: unset)


# (condition that must hold, config key, its value, what is allowed)
ScalingError = tuple[bool, str, object, str]
_KEY = "model.rope_scaling."


def _powers(head_dim: int, theta: float) -> np.ndarray:
    """theta^(2i/head_dim), i < head_dim / 2, in float32 (Python scalars stay weak, so NumPy computes all of
    this module in float32, as torch does in transformers)."""
    return theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))


def _plain(head_dim: int, theta: float) -> np.ndarray:
    return 1.0 / _powers(head_dim, theta)


def _none(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    return _plain(head_dim, theta)


def _linear(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    return _plain(head_dim, theta) / s.factor


def _llama3(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    inv_freq = _plain(head_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_len / s.low_freq_factor  # longer waves than this: interpolated
    high_freq_wavelen = s.original_max_len / s.high_freq_factor  # shorter waves than this: kept
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)


def _yarn_correction_dim(rotations: float, head_dim: int, theta: float, context: int) -> float:
    """The (fractional) dimension whose frequency turns `rotations` times over `context` positions."""
    return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    powers = _powers(head_dim, theta)
    extrapolated, interpolated = 1.0 / powers, 1.0 / (s.factor * powers)
    low = math.floor(_yarn_correction_dim(s.beta_fast, head_dim, theta, s.original_max_len))
    high = math.ceil(_yarn_correction_dim(s.beta_slow, head_dim, theta, s.original_max_len))
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp, as transformers does
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    return interpolated * (1 - keep) + extrapolated * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(s: RopeScaling) -> float:
    if s.mscale and s.mscale_all_dim:
        return float(yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim))
    return yarn_mscale(s.factor)


def _yarn_softmax_mscale(s: RopeScaling) -> float:
    return yarn_mscale(s.factor, s.mscale_all_dim) ** 2 if s.mscale_all_dim else 1.0


def _one(s: RopeScaling) -> float:
    return 1.0


def _no_errors(s: RopeScaling) -> list[ScalingError]:
    return []


def _factor_errors(s: RopeScaling) -> list[ScalingError]:
    return [(s.factor >= 1, _KEY + "factor", s.factor, f"a number >= 1 for type '{s.type}'")]


def _original_len_errors(s: RopeScaling) -> list[ScalingError]:
    ok = isinstance(s.original_max_len, int) and s.original_max_len > 0
    what = f"the pretrained context length (an int > 0) for type '{s.type}'"
    return [*_factor_errors(s), (ok, _KEY + "original_max_len", s.original_max_len, what)]


def _llama3_errors(s: RopeScaling) -> list[ScalingError]:
    return [
        *_original_len_errors(s),
        (s.low_freq_factor > 0, _KEY + "low_freq_factor", s.low_freq_factor, "a number > 0"),
        (
            s.high_freq_factor > s.low_freq_factor,
            _KEY + "high_freq_factor",
            s.high_freq_factor,
            f"a number > low_freq_factor ({s.low_freq_factor})",
        ),
    ]


def _yarn_errors(s: RopeScaling) -> list[ScalingError]:
    return [
        *_original_len_errors(s),
        (s.beta_slow > 0, _KEY + "beta_slow", s.beta_slow, "a number > 0 (rotations)"),
        (s.beta_fast > s.beta_slow, _KEY + "beta_fast", s.beta_fast, f"a number > beta_slow ({s.beta_slow})"),
        (s.mscale >= 0, _KEY + "mscale", s.mscale, "a number >= 0"),
        (s.mscale_all_dim >= 0, _KEY + "mscale_all_dim", s.mscale_all_dim, "a number >= 0 (0: unset)"),
    ]


class RopeType(NamedTuple):
    """One scaling scheme: (head_dim, theta, scaling) -> [head_dim // 2] float32 inverse frequencies, the
    factor cos/sin are multiplied by, the checks its settings must pass, and the factor on the softmax scale
    (DeepSeek's MLA)."""

    inverse_frequencies: Callable[[int, float, RopeScaling], np.ndarray]
    attention_factor: Callable[[RopeScaling], float] = _one
    errors: Callable[[RopeScaling], list[ScalingError]] = _no_errors
    softmax_mscale: Callable[[RopeScaling], float] = _one


ROPE_SCALINGS: dict[str, RopeType] = {
    "none": RopeType(_none),
    "linear": RopeType(_linear, errors=_factor_errors),
    "llama3": RopeType(_llama3, errors=_llama3_errors),
    "yarn": RopeType(_yarn, _yarn_attention_factor, _yarn_errors, _yarn_softmax_mscale),
}


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """[head_dim // 2] float32: the angle per position of each rotated pair of channels."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim > 0, got {head_dim}")
    inv_freq = ROPE_SCALINGS[scaling.type].inverse_frequencies(head_dim, float(theta), scaling)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (head_dim // 2,), (inv_freq.dtype, inv_freq.shape)
    return inv_freq


def attention_factor(scaling: RopeScaling) -> float:
    """What cos and sin are multiplied by (1.0 except for yarn)."""
    return float(ROPE_SCALINGS[scaling.type].attention_factor(scaling))


def softmax_mscale(scaling: RopeScaling) -> float:
    """What DeepSeek's MLA multiplies its softmax scale by: yarn_mscale(factor, mscale_all_dim)^2 under yarn
    with mscale_all_dim set, else 1."""
    return float(ROPE_SCALINGS[scaling.type].softmax_mscale(scaling))


def scaling_errors(s: RopeScaling) -> list[ScalingError]:
    """(condition that must hold, config key, value, what is allowed) for every rule `s` is subject to; the
    type's own rules only when the type exists."""
    known = s.type in ROPE_SCALINGS
    allowed = "one of " + ", ".join(repr(name) for name in ROPE_SCALINGS)
    return [(known, _KEY + "type", s.type, allowed), *(ROPE_SCALINGS[s.type].errors(s) if known else [])]
