"""Calibration: what each weight's matmul sees as input on calibration text, through the model's own forward pass.

`statistics(cfg, params, windows_NT)` runs the model over token windows with the "calibration" collection mutable,
which makes the matmuls' `model.layers.observe` calls sum, per weight, x x^T over the input rows x (K: the weight's
fan-in, flattened as `weights.Layout.to_matrix` flattens it), sum |x| and the row count (model/layers.py `Dense`,
`Embed.attend` for a tied head, model/moe.py's router and experts: an expert sees only the rows routed to it).
Scanned layer groups stack their statistics on the leading axis, as they stack their params, so a weight's
`Stats` have the leading axes of its matrix [..., K, N]. GPTQ reads the Hessian x x^T, AWQ the mean |x|.

Weights no forward pass reads as a matmul input get no statistics: an untied embedding (a lookup), the extra
heads that run only in training (MTP); the methods round those to nearest. Calibration windows come from
`data.calibration_windows` (the training split, or a text file).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.layers import CALIBRATION
from model.transformer import Transformer

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Stats:
    """A weight's input statistics, float64: `xx` [..., K, K] sum of x x^T, `abs` [..., K] sum of |x|, `count`
    [...] rows seen (leading axes: stacked layers, experts)."""

    xx: np.ndarray
    abs: np.ndarray
    count: np.ndarray

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs / np.maximum(self.count, 1.0)[..., None]

    def __getitem__(self, index) -> Stats:
        """One matrix's statistics (index into the leading axes)."""
        return Stats(self.xx[index], self.abs[index], self.count[index])


@functools.cache
def _observer(cfg: ModelConfig):
    model = Transformer(dataclasses.replace(cfg, remat="none"))

    @jax.jit
    def observe(variables, tokens_BT):
        _, sown = model.apply(variables, tokens_BT, mutable=[CALIBRATION])
        return sown[CALIBRATION]

    return observe


def statistics(cfg: ModelConfig, params: dict, windows_NT: np.ndarray, batch_size: int = 8) -> dict[Path, Stats]:
    """{weight's parameter path: its input statistics} over token windows [N, T] (T <= cfg.max_seq_len), run
    `batch_size` windows at a time (a shorter last batch compiles once more). `params`: float params, or
    {"params", "state"}."""
    variables = params if "params" in params else {"params": params}
    observe = _observer(cfg)
    windows_NT = np.asarray(windows_NT, np.int32)
    totals = None
    for start in range(0, len(windows_NT), batch_size):
        sums = observe(variables, jnp.asarray(windows_NT[start : start + batch_size]))
        sums = jax.tree.map(lambda x: np.asarray(x, np.float64), sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return {path: Stats(d["xx"], d["abs"], d["count"]) for path, d in _by_path(totals).items()}


def _by_path(tree: dict, prefix: Path = ()) -> dict[Path, dict]:
    """The sown sums, keyed by their weight's parameter path (a sum is the dict {"xx", "abs", "count"})."""
    if set(tree) == {"xx", "abs", "count"}:
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out |= _by_path(v, (*prefix, k))
    return out
