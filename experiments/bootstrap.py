"""Paired bootstrap over documents: is config B's downstream score really different from config A's?

Two configs scored on the same documents (a task's examples) differ by the mean of their per-document differences;
resampling the documents with replacement, the same draw for both configs, gives that mean's sampling spread. Pairing
removes what the documents share (an easy document is easy for both), so a small consistent shift shows through
document-to-document variation far larger than itself (Koehn 2004; Berg-Kirkpatrick et al. 2012).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # resampled indices drawn at a time (32 MiB of int64), whatever the number of documents


@dataclasses.dataclass(frozen=True)
class Difference:
    """B's mean minus A's over the paired documents, with its bootstrap interval at `confidence`."""

    difference: float
    low: float
    high: float
    documents: int
    confidence: float
    samples: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero: a difference at this confidence."""
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        """`+0.031 [+0.004, +0.058] *`, the star marking an interval that excludes zero."""
        star = " *" if self.excludes_zero else ""
        return f"{self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}]{star}"


def paired_bootstrap(
    a_D: np.ndarray, b_D: np.ndarray, *, samples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> Difference:
    """Mean of b - a over documents and its percentile interval from `samples` resamples of the documents.

    `a_D`, `b_D`: per-document scores of two configs, index d the same document in both; or, with several seeds per
    config, (seeds, documents) arrays, each config with its own number of seeds. Each document's score is averaged
    over its config's seeds first: the document is the resampling unit (what a new evaluation set would redraw), and
    the seeds only make each document's score less noisy. The interval leaves out how much a config's mean moves
    between seeds (compare the runs' own scores for that).

    Percentile rather than BCa: the statistic is a mean over hundreds or thousands of documents, whose resampling
    distribution is close to normal and nearly unskewed, so BCa's bias and skew corrections change the endpoints by
    less than the Monte Carlo error of 10,000 resamples; the percentile interval needs no jackknife and is the usual
    choice for paired tests in NLP. With a few dozen documents, or scores nearly all 0 or all 1, any bootstrap
    interval is too narrow.
    """
    a_D, b_D = _per_document(a_D, "a_D"), _per_document(b_D, "b_D")
    if a_D.shape != b_D.shape:
        raise ValueError(f"a_D has {a_D.shape[0]} documents and b_D {b_D.shape[0]}: they must be the same documents")
    if samples < 1:
        raise ValueError(f"samples={samples}: must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be strictly between 0 and 1")
    diff_D = b_D - a_D
    D = diff_D.shape[0]
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_ELEMENTS // D)
    means_S = np.empty(samples)
    for start in range(0, samples, rows):  # one resample per row; the same documents for a and b (paired)
        stop = min(samples, start + rows)
        index_RD = rng.integers(0, D, size=(stop - start, D))
        means_S[start:stop] = diff_D[index_RD].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means_S, [tail, 1.0 - tail])
    return Difference(float(diff_D.mean()), float(low), float(high), D, confidence, samples)


def _per_document(scores, name: str) -> np.ndarray:
    """(documents,) scores, averaged over the seeds axis of a (seeds, documents) array."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim not in (1, 2):
        raise ValueError(f"{name} has shape {scores.shape}: must be (documents,) or (seeds, documents)")
    if scores.size == 0:
        raise ValueError(f"{name} has shape {scores.shape}: needs at least one seed and one document")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} holds a NaN or infinite score")
    return scores.mean(axis=0) if scores.ndim == 2 else scores
