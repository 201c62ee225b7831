"""RoPE scaling against the published formulas, re-derived here one frequency at a time in float64: position
interpolation, Llama 3.1's wavelength bands (with its published constants), YaRN's ramp and mscale (with
DeepSeek-V3's settings), and the validation rules."""

import math

import numpy as np
import pytest

from model.rope import (
    ROPE_SCALINGS,
    RopeScaling,
    attention_factor,
    inverse_frequencies,
    scaling_errors,
    softmax_mscale,
    yarn_mscale,
)

RTOL = 2e-6  # the module computes in float32, as transformers does

# Llama 3.1's published rope_scaling (meta-llama/Llama-3.1-8B config.json): theta 500000, head_dim 128.
LLAMA31 = RopeScaling("llama3", factor=8.0, original_max_len=8192, low_freq_factor=1.0, high_freq_factor=4.0)
# DeepSeek-V3's published rope_scaling: qk_rope_head_dim 64, theta 10000.
DEEPSEEK_V3 = RopeScaling(
    "yarn", factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0
)


def rope_reference(head_dim, theta):
    """RoFormer: theta_i = theta^(-2i/d) for i < d/2."""
    return np.asarray([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)])


def llama31_reference(head_dim, theta, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's apply_scaling for Llama 3.1, band by band."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in rope_reference(head_dim, theta):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.asarray(out)


def yarn_reference(head_dim, theta, factor, original, beta_fast, beta_slow):
    """YaRN's "NTK-by-parts" as the YaRN and DeepSeek code do it: dimension i of the d/2 turns
    original * theta^(-2i/d) / (2 pi) times over the original context, so the dimension turning r times is
    d * ln(original / (2 pi r)) / (2 ln theta); those below the beta_fast one keep their frequency, those above
    the beta_slow one are divided by the factor, with a linear ramp between (ends rounded outward)."""

    def dim_turning(r):
        return head_dim * math.log(original / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(dim_turning(beta_fast)), 0)
    high = min(math.ceil(dim_turning(beta_slow)), head_dim - 1)
    out = []
    for i, freq in enumerate(rope_reference(head_dim, theta)):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep, 1: interpolate
        out.append(freq * (1 - ramp) + freq / factor * ramp)
    return np.asarray(out)


def test_none_is_plain_rope():
    for head_dim, theta in [(8, 10_000.0), (64, 10_000.0), (128, 500_000.0)]:
        got = inverse_frequencies(head_dim, theta, RopeScaling())
        assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
        np.testing.assert_allclose(got, rope_reference(head_dim, theta), rtol=RTOL)
    assert attention_factor(RopeScaling()) == 1.0


def test_linear_divides_every_frequency():
    s = RopeScaling("linear", factor=4.0)
    np.testing.assert_allclose(inverse_frequencies(64, 10_000.0, s), rope_reference(64, 10_000.0) / 4, rtol=RTOL)
    assert attention_factor(s) == 1.0


def test_llama31_bands_match_meta_reference():
    got = inverse_frequencies(128, 500_000.0, LLAMA31)
    np.testing.assert_allclose(got, llama31_reference(128, 500_000.0, 8.0, 1.0, 4.0, 8192), rtol=RTOL)
    assert attention_factor(LLAMA31) == 1.0


def test_llama31_band_properties():
    """Short waves (< 8192 / 4 positions) unchanged, long ones (> 8192) divided by 8, the ones between scaled by
    a ratio that falls from 1 to 1/8 as the wavelength grows, and each band kind is present."""
    plain = rope_reference(128, 500_000.0)
    ratio = inverse_frequencies(128, 500_000.0, LLAMA31) / plain
    wavelen = 2 * math.pi / plain
    high, low, medium = wavelen < 2048, wavelen > 8192, (wavelen >= 2048) & (wavelen <= 8192)
    assert high.sum() > 0 and low.sum() > 0 and medium.sum() > 0
    np.testing.assert_allclose(ratio[high], 1.0, rtol=RTOL)
    np.testing.assert_allclose(ratio[low], 1 / 8, rtol=RTOL)
    assert np.all((ratio[medium] < 1) & (ratio[medium] > 1 / 8))
    assert np.all(np.diff(ratio) <= 1e-6)  # wavelength grows with the index: the ratio never rises
    # smooth: the blend meets both ends (ratio 1 at wavelength 2048, 1/8 at 8192) linearly in 1 / wavelength
    smooth = (8192 / wavelen[medium] - 1) / 3
    np.testing.assert_allclose(ratio[medium], (1 - smooth) / 8 + smooth, rtol=RTOL)


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [
        (64, 10_000.0, DEEPSEEK_V3),
        (128, 1_000_000.0, RopeScaling("yarn", factor=4.0, original_max_len=32768)),  # Qwen2.5's long context
        (16, 10_000.0, RopeScaling("yarn", factor=2.0, original_max_len=64, beta_fast=8.0, beta_slow=2.0)),
    ],
)
def test_yarn_ramp_matches_reference(head_dim, theta, scaling):
    s = scaling
    want = yarn_reference(head_dim, theta, s.factor, s.original_max_len, s.beta_fast, s.beta_slow)
    np.testing.assert_allclose(inverse_frequencies(head_dim, theta, s), want, rtol=RTOL)


def test_yarn_keeps_fast_dimensions_and_interpolates_slow_ones():
    """Dimensions turning more than beta_fast times over the original context keep their frequency, those
    turning fewer than beta_slow times are divided by the factor, and both kinds exist."""
    s = DEEPSEEK_V3
    plain = rope_reference(64, 10_000.0)
    ratio = inverse_frequencies(64, 10_000.0, s) / plain
    turns = s.original_max_len * plain / (2 * math.pi)
    fast, slow = turns > s.beta_fast, turns < s.beta_slow
    assert fast.sum() > 0 and slow.sum() > 0
    np.testing.assert_allclose(ratio[fast], 1.0, rtol=RTOL)
    np.testing.assert_allclose(ratio[slow], 1 / s.factor, rtol=RTOL)


def test_yarn_attention_factor_and_mscale():
    # the YaRN paper's sqrt(1/t) = 0.1 ln(s) + 1 when mscale_all_dim is unset
    assert attention_factor(RopeScaling("yarn", factor=4.0, original_max_len=4096)) == pytest.approx(
        0.1 * math.log(4.0) + 1
    )
    # DeepSeek-V3: mscale = mscale_all_dim, so cos/sin stay unscaled and the softmax scale takes mscale^2
    assert attention_factor(DEEPSEEK_V3) == pytest.approx(1.0)
    assert softmax_mscale(DEEPSEEK_V3) == pytest.approx((0.1 * math.log(40.0) + 1) ** 2)
    # DeepSeek-V2-Lite style, different mscales: the ratio of the two corrections
    s = RopeScaling("yarn", factor=40.0, original_max_len=4096, mscale=0.707, mscale_all_dim=0.5)
    want = (0.1 * 0.707 * math.log(40) + 1) / (0.1 * 0.5 * math.log(40) + 1)
    assert attention_factor(s) == pytest.approx(want)
    # transformers uses the ratio only when both are set: mscale alone leaves the paper's default
    s = RopeScaling("yarn", factor=40.0, original_max_len=4096, mscale=0.707)
    assert attention_factor(s) == pytest.approx(0.1 * math.log(40) + 1)
    assert yarn_mscale(1.0, 3.0) == 1.0 and yarn_mscale(0.5) == 1.0
    assert softmax_mscale(LLAMA31) == 1.0 and softmax_mscale(RopeScaling("yarn", 4.0, 4096)) == 1.0


def failures(**fields):
    return {key: (value, allowed) for ok, key, value, allowed in scaling_errors(RopeScaling(**fields)) if not ok}


def test_valid_settings_pass():
    for s in [RopeScaling(), RopeScaling("linear", 2.0), LLAMA31, DEEPSEEK_V3]:
        assert not [e for e in scaling_errors(s) if not e[0]], s


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(type="bogus"), "model.rope_scaling.type"),
        (dict(type="linear", factor=0.5), "model.rope_scaling.factor"),
        (dict(type="llama3", factor=8.0), "model.rope_scaling.original_max_len"),
        (
            dict(type="llama3", factor=8.0, original_max_len=8192, low_freq_factor=4.0),
            "model.rope_scaling.high_freq_factor",
        ),
        (
            dict(type="llama3", factor=8.0, original_max_len=8192, low_freq_factor=0.0),
            "model.rope_scaling.low_freq_factor",
        ),
        (dict(type="yarn", factor=4.0, original_max_len=-1), "model.rope_scaling.original_max_len"),
        (dict(type="yarn", factor=4.0, original_max_len=4096, beta_fast=1.0), "model.rope_scaling.beta_fast"),
        (dict(type="yarn", factor=4.0, original_max_len=4096, beta_slow=0.0), "model.rope_scaling.beta_slow"),
        (
            dict(type="yarn", factor=4.0, original_max_len=4096, mscale_all_dim=-1.0),
            "model.rope_scaling.mscale_all_dim",
        ),
    ],
)
def test_bad_settings_name_the_key(fields, key):
    failed = failures(**fields)
    assert list(failed) == [key], failed
    value, allowed = failed[key]
    assert value == getattr(RopeScaling(**fields), key.rsplit(".", 1)[1]) and allowed


def test_bad_type_lists_the_known_ones():
    ((_, allowed),) = failures(type="bogus").values()
    assert all(repr(name) in allowed for name in ROPE_SCALINGS)
