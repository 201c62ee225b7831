"""The paired bootstrap over documents (experiments/bootstrap.py) against normal theory and an unpaired reference."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import bootstrap as bootstrap_lib
from experiments.bootstrap import Difference, paired_bootstrap


@pytest.mark.parametrize("chunk", [bootstrap_lib.CHUNK_ELEMENTS, 5000 * 7])  # one draw, or many with a short last
def test_the_interval_of_many_documents_is_the_normal_theory_one(monkeypatch, chunk):
    """With 5000 documents the mean difference is close to normal: mean +- 1.96 sd / sqrt(D) of the per-document
    differences, to within Monte Carlo error (about 2% of the half-width at 10,000 resamples)."""
    monkeypatch.setattr(bootstrap_lib, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(1)
    a_D = rng.normal(0.0, 1.0, 5000)
    b_D = a_D + rng.normal(0.03, 0.5, 5000)
    diff_D = b_D - a_D
    half = 1.96 * diff_D.std(ddof=1) / np.sqrt(5000)
    got = paired_bootstrap(a_D, b_D)
    assert got.difference == pytest.approx(diff_D.mean(), abs=1e-12) and got.documents == 5000
    assert got.low == pytest.approx(diff_D.mean() - half, abs=0.04 * half)
    assert got.high == pytest.approx(diff_D.mean() + half, abs=0.04 * half)
    assert got.excludes_zero and got.samples == 10_000 and got.confidence == 0.95


def test_identical_configs_give_an_interval_around_zero():
    rng = np.random.default_rng(2)
    a_D = (rng.random(300) < 0.4).astype(float)  # accuracies: 0 or 1 per document
    same = paired_bootstrap(a_D, a_D)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    # Differences that cancel exactly (+0.5 on half the documents, -0.5 on the rest): no shift, a symmetric interval.
    b_D = a_D + np.where(np.arange(300) % 2 == 0, 0.5, -0.5)
    balanced = paired_bootstrap(a_D, b_D)
    assert balanced.difference == pytest.approx(0.0, abs=1e-12) and balanced.low < 0.0 < balanced.high
    assert not balanced.excludes_zero and str(balanced).startswith("+0.000 [-0.0")


def test_a_clear_shift_excludes_zero_and_its_sign_is_b_minus_a():
    rng = np.random.default_rng(3)
    a_D = (rng.random(500) < 0.5).astype(float)
    b_D = np.maximum(a_D, (rng.random(500) < 0.2).astype(float))  # b also gets right some of what a got wrong
    up, down = paired_bootstrap(a_D, b_D), paired_bootstrap(b_D, a_D)
    assert up.difference == pytest.approx((b_D - a_D).mean()) and up.difference > 0.05
    assert 0.0 < up.low < up.difference < up.high and up.excludes_zero
    assert down.high < 0.0 and down.excludes_zero
    assert str(up) == f"{up.difference:+.3f} [{up.low:+.3f}, {up.high:+.3f}] *"


def test_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(4)
    a_D, b_D = rng.random(200), rng.random(200)
    assert paired_bootstrap(a_D, b_D, seed=7) == paired_bootstrap(a_D, b_D, seed=7)
    other = paired_bootstrap(a_D, b_D, seed=8)
    assert other.low != paired_bootstrap(a_D, b_D, seed=7).low
    narrower = paired_bootstrap(a_D, b_D, seed=7, confidence=0.5)
    assert narrower.low > other.low and narrower.high < other.high


def test_seeds_are_averaged_per_document_and_documents_stay_paired():
    """Documents vary far more than the configs differ (difficulty sd 1 against a shift of 0.02), but every
    document moves by about the shift: resampling documents in pairs sees it; resampling each config's documents
    on their own (the unpaired reference here) does not, and neither does pairing the wrong documents."""
    rng = np.random.default_rng(5)
    D = 400
    difficulty_D = rng.normal(0.0, 1.0, D)
    a_SD = difficulty_D + rng.normal(0.0, 0.05, (3, D))  # 3 seeds of config a
    b_SD = difficulty_D + 0.02 + rng.normal(0.0, 0.05, (2, D))  # 2 seeds of config b
    paired = paired_bootstrap(a_SD, b_SD)
    assert paired == paired_bootstrap(a_SD.mean(axis=0), b_SD.mean(axis=0))  # seeds averaged first
    assert paired.excludes_zero and paired.documents == D
    assert paired.difference == pytest.approx(b_SD.mean() - a_SD.mean())

    draw = np.random.default_rng(0)
    a_D, b_D = a_SD.mean(axis=0), b_SD.mean(axis=0)
    unpaired = b_D[draw.integers(0, D, (10_000, D))].mean(1) - a_D[draw.integers(0, D, (10_000, D))].mean(1)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert low < 0.0 < high  # unpaired: the shift is lost among the documents
    shuffled = paired_bootstrap(a_D, draw.permutation(b_D))
    assert not shuffled.excludes_zero and shuffled.high - shuffled.low > 10 * (paired.high - paired.low)


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        (np.zeros(5), np.zeros(6), {}, "a_D has 5 documents and b_D 6: they must be the same documents"),
        (np.zeros((2, 5)), np.zeros((3, 4)), {}, "a_D has 5 documents and b_D 4"),
        (np.zeros((2, 2, 2)), np.zeros(2), {}, r"a_D has shape \(2, 2, 2\): must be \(documents,\) or"),
        (np.zeros(0), np.zeros(0), {}, "needs at least one seed and one document"),
        (np.zeros(3), np.array([0.0, np.nan, 1.0]), {}, "b_D holds a NaN or infinite score"),
        (np.zeros(3), np.zeros(3), {"samples": 0}, "samples=0: must be >= 1"),
        (np.zeros(3), np.zeros(3), {"confidence": 95}, "confidence=95: must be strictly between 0 and 1"),
    ],
)
def test_bad_inputs_are_one_line_errors(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        paired_bootstrap(a, b, **kwargs)
    assert "\n" not in str(error.value)


def test_a_difference_reads_as_a_table_cell():
    assert str(Difference(0.0312, 0.0041, 0.0583, 200, 0.95, 10_000)) == "+0.031 [+0.004, +0.058] *"
    assert str(Difference(-0.01, -0.03, 0.01, 200, 0.95, 10_000)) == "-0.010 [-0.030, +0.010]"
